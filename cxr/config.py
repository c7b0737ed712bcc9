"""One dataclass for a run: defaults, `--flags` generated from its fields, YAML files, and the demo preset.

    config = parse_config(["--data-dir", "/data/nih", "--epochs", "20"])
    config.to_dict()                      # plain dict: printed, written to the run dir, stored in checkpoints
    Config.from_dict(checkpoint["config"])

Precedence: dataclass defaults < demo preset (no --data-dir) < --config FILE.yaml < flags on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cxr.errors import ConfigError
from cxr.transforms import PREPROCESS_CHOICES, Preprocessing


def _opt(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    """Everything that defines a training run; evaluate.py and explain.py rebuild the model from it."""

    # data
    data_dir: str = _opt("", "NIH folder (Data_Entry_2017.csv, images/ or images_0NN/images/); empty: the synthetic demo set")
    views: str = _opt("both", "view positions to keep", ("both", "PA", "AP"))
    split: str = _opt("auto", "official train_val_list/test_list, a seeded patient split, or auto (official if present)", ("auto", "official", "random"))
    val_fraction: float = _opt(0.1, "fraction of the training patients held out for validation")
    test_fraction: float = _opt(0.2, "fraction of patients for the test split (random split only)")
    skip_missing: bool = _opt(False, "drop table rows whose image is not on disk (with a warning) instead of failing")
    cache_dir: str = _opt("", "decoded-image cache built by scripts/prepare_cache.py (optional)")
    synthetic_patients: int = _opt(400, "patients in the generated demo set (no --data-dir)")
    synthetic_size: int = _opt(128, "pixel size of the generated demo images (no --data-dir)")
    # preprocessing and augmentation
    image_size: int = _opt(224, "network input size in pixels")
    preprocess: str = _opt("clahe", "contrast enhancement applied at the working resolution", PREPROCESS_CHOICES)
    clahe_clip: float = _opt(2.0, "CLAHE clip limit")
    clahe_grid: int = _opt(8, "CLAHE tile grid size (tiles per side)")
    hflip: bool = _opt(False, "random horizontal flips (off by default: the heart is on the left)")
    augment_strength: float = _opt(1.0, "scales shift/scale/rotate/brightness/contrast ranges; 0 disables augmentation")
    # model
    weights: str = _opt("auto", "trunk initialisation: imagenet, none, a .pth/.pt file, or auto (imagenet; none for the demo)")
    hidden: str = _opt("512", "hidden sizes of the dense head, comma separated (empty: one linear layer)")
    dropout: float = _opt(0.5, "dropout in the dense head")
    output_stride: int = _opt(32, "trunk output stride: 32 (standard), or 16/8 (last blocks dilated: finer Grad-CAM maps, slower)", (32, 16, 8))
    pool: str = _opt("avg", "global pooling of the last feature map: avg, lse (log-sum-exp, Wang et al. 2017) or max", ("avg", "lse", "max"))
    lse_r: float = _opt(10.0, "sharpness r of --pool lse: avg as r -> 0, max as r -> infinity")
    # optimisation
    epochs: int = _opt(30, "total epochs (warm-up included)")
    warmup_epochs: int = _opt(3, "phase 1: epochs with the trunk frozen, only the head trains")
    unfreeze: str = _opt("2", "phase 2: how many of the last dense blocks to unfreeze (0-4) or 'all'")
    batch_size: int = _opt(128, "images per micro-batch on each process (128 fills one large GPU at 224 px)")
    eval_batch_size: int = _opt(256, "images per validation batch on each process")
    accum_steps: int = _opt(1, "micro-batches per optimizer step (gradient accumulation; DDP syncs on the last only)")
    lr: float = _opt(1e-3, "peak learning rate of the head, for a global batch of 128 (see README: scale it by "
                     "sqrt(global batch / 128))")
    trunk_lr_mult: float = _opt(0.1, "trunk learning rate = lr * this, in phase 2")
    optimizer: str = _opt("adam", "optimizer", ("adam", "adamw"))
    weight_decay: float = _opt(1e-5, "weight decay")
    scheduler: str = _opt("cosine", "warm-up then cosine decay per step, or reduce-on-plateau of validation AUROC", ("cosine", "plateau"))
    lr_warmup_steps: int = _opt(100, "linear learning-rate warm-up steps (cosine schedule)")
    label_smoothing: float = _opt(0.05, "targets move toward 0.5 by this amount")
    pos_weight: bool = _opt(False, "weight positives by negatives/positives of the training prevalence")
    patience: int = _opt(5, "early stopping: epochs without a new best validation mean AUROC")
    grad_clip: float = _opt(0.0, "clip the gradient norm to this value (0: off)")
    # hardware
    device: str = _opt("auto", "auto (cuda if available), cuda or cpu", ("auto", "cuda", "cpu"))
    amp: str = _opt("auto", "mixed precision: auto (on for CUDA, off on CPU), on, off", ("auto", "on", "off"))
    amp_dtype: str = _opt("auto", "autocast dtype: auto (bf16 where supported, else fp16), bf16 or fp16", ("auto", "bf16", "fp16"))
    channels_last: str = _opt("on", "channels_last memory format (faster for DenseNet on CUDA and, measured here, on CPU too)", ("on", "off"))
    compile: bool = _opt(False, "torch.compile the (DDP-wrapped) model")
    compile_mode: str = _opt("default", "torch.compile mode (reduce-overhead: CUDA graphs)",
                             ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    memory_efficient: bool = _opt(False, "checkpoint DenseNet's dense layers (recompute in backward): less memory at "
                                  "high resolution, ~20-30% slower steps; evaluation and Grad-CAM run without it")
    sync_bn: bool = _opt(False, "SyncBatchNorm across processes under DDP")
    workers: int = _opt(4, "DataLoader worker processes per training process")
    # bookkeeping
    out: str = _opt("", "run directory (default runs/<timestamp>)")
    resume: str = _opt("", "continue a run: its directory or a checkpoint file; 'auto': --out's last.pt if there is "
                       "one, else a fresh run (the same command for the first start and every restart)")
    overwrite: bool = _opt(False, "let a fresh run replace the checkpoints of another run in --out")
    seed: int = _opt(0, "random seed (each process adds its rank)")
    max_steps_per_epoch: int = _opt(0, "stop each epoch after this many steps (0: full epochs); for smoke tests")
    log_every: int = _opt(20, "optimizer steps between TensorBoard scalars and the cross-rank check for a non-finite "
                          "loss or a stop signal")
    val_every: int = _opt(1, "validate (and select best.pt) every this many epochs, and after the last one")
    tensorboard: bool = _opt(True, "write TensorBoard logs into the run directory")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Rebuild from a dict (unknown keys from newer versions are ignored, missing ones take defaults)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(size) for size in self.hidden.split(",") if size.strip())

    @property
    def is_demo(self) -> bool:
        return not self.data_dir


# The demo must finish in about 3 minutes on 2 CPU cores and still learn: small images, no download.
DEMO_PRESET: dict[str, Any] = {
    "weights": "none",
    "image_size": 64,
    "epochs": 7,
    "warmup_epochs": 1,
    "unfreeze": "all",
    "batch_size": 32,
    "eval_batch_size": 64,
    "lr": 1e-3,
    "trunk_lr_mult": 1.0,
    "lr_warmup_steps": 20,
    "patience": 10,
    "workers": 1,
    "log_every": 5,
}


def _str2bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per Config field (`data_dir` -> `--data-dir`), all defaulting to None."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of Config fields (flags override it)")
    defaults = Config()
    for item in fields(Config):
        flag = "--" + item.name.replace("_", "-")
        kind = type(getattr(defaults, item.name))
        kwargs: dict[str, Any] = {"default": None, "help": f"{item.metadata['help']} (default: {getattr(defaults, item.name)!r})"}
        if kind is bool:
            kwargs.update(nargs="?", const=True, type=_str2bool, metavar="BOOL")
        else:
            kwargs.update(type=kind, choices=item.metadata.get("choices"))
        parser.add_argument(flag, **kwargs)
    parser.set_defaults()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file of Config fields; unknown keys are an error that names them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from error
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read it ({error.strerror or error})") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({error})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value")
    bad_keys = [key for key in values if not isinstance(key, str)]
    if bad_keys:
        raise ConfigError(f"--config {path}: option names must be text, got {bad_keys[0]!r}; see train.py --help")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - {f.name for f in fields(Config)})
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}; see train.py --help")
    return {key: _yaml_value(path, key, value) for key, value in values.items()}


def _yaml_value(path: Path, key: str, value: Any) -> Any:
    """Convert a YAML value to its field's type, as argparse does for flags (YAML reads `1e-3` as text, `512` as int)."""
    item = next(item for item in fields(Config) if item.name == key)
    kind = type(item.default)
    try:
        if kind is bool:
            converted = value if isinstance(value, bool) else _str2bool(str(value))
        elif kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        elif value is None or isinstance(value, (dict, list)):
            raise ValueError(value)
        else:
            converted = kind(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ConfigError(f"--config {path}: {key}: expected {kind.__name__}, got {value!r}") from error
    choices = item.metadata.get("choices")
    if choices and converted not in choices:
        raise ConfigError(f"--config {path}: {key}: must be one of {', '.join(map(str, choices))}, got {converted!r}")
    return converted


def config_from_args(args: argparse.Namespace) -> Config:
    """Apply the precedence rules to parsed flags and return the resolved Config."""
    explicit = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    from_file = load_yaml(args.config) if getattr(args, "config", None) else {}
    data_dir = explicit.get("data_dir", from_file.get("data_dir", ""))
    values: dict[str, Any] = {} if data_dir else dict(DEMO_PRESET)
    values.update(from_file)
    values.update(explicit)
    config = Config(**values)
    validate(config)
    return config


# Flags that may differ when a run is resumed: they change how it runs or how long, not what it learns from
# the epochs already done. Every other field is fixed by the run's record; a different value is refused.
RESUMABLE_FIELDS = ("epochs", "patience", "workers", "log_every", "tensorboard", "device", "data_dir", "cache_dir",
                    "max_steps_per_epoch", "resume", "out", "overwrite", "val_every", "eval_batch_size", "compile",
                    "compile_mode", "memory_efficient")


def config_for_resume(args: argparse.Namespace, stored: dict[str, Any], run_dir: str) -> Config:
    """The run's own config with the changes that --resume allows (flags, then --config FILE) applied.

    The resumed run continues in `run_dir` (the folder given to --resume). A flag or YAML key that would make
    the record and the run disagree (the learning rate of an optimizer restored from the checkpoint, the
    architecture of its weights...) is a ConfigError naming it, never silently applied or ignored.
    """
    values = Config.from_dict(stored).to_dict()
    requested = load_yaml(args.config) if getattr(args, "config", None) else {}
    requested.update({f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None})
    requested.pop("resume", None)
    if "out" in requested and Path(requested.pop("out")).resolve() != Path(run_dir).resolve():
        raise ConfigError(f"--out cannot differ from the --resume directory ({run_dir}): a resumed run continues in "
                          "its own folder; copy the folder first to branch a run")
    fixed = [f"--{name.replace('_', '-')} (the run has {values[name]!r}, given {value!r})"
             for name, value in requested.items() if name not in RESUMABLE_FIELDS and value != values[name]]
    if fixed:
        raise ConfigError(f"cannot change {'; '.join(fixed)} when resuming {run_dir}: the restored optimizer, schedule "
                          "and weights were made with the run's values. Resume without them, or start a new run "
                          "(--out NEW --weights RUN/best.pt) to continue with other settings")
    values.update(requested)
    values["out"] = str(run_dir)
    config = Config(**values)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Reject values no run could use, naming the flag."""
    problems = []
    if config.epochs < 1:
        problems.append("--epochs must be at least 1")
    if not 0 <= config.warmup_epochs <= config.epochs:
        problems.append("--warmup-epochs must be between 0 and --epochs")
    if config.batch_size < 1:
        problems.append("--batch-size must be at least 1")
    if config.eval_batch_size < 1:
        problems.append("--eval-batch-size must be at least 1")
    if config.accum_steps < 1:
        problems.append(f"--accum-steps must be at least 1 (1: no accumulation), got {config.accum_steps}")
    if config.val_every < 1:
        problems.append(f"--val-every must be at least 1 epoch, got {config.val_every}")
    if not 32 <= config.image_size <= 4096:
        problems.append("--image-size must be at least 32 (DenseNet downsamples by 32) and at most 4096")
    else:
        try:
            Preprocessing.from_config(config)
        except ConfigError as error:
            problems.append(str(error))
    if not 0 <= config.label_smoothing < 1:
        problems.append("--label-smoothing must be in [0, 1)")
    if not 0 < config.val_fraction < 1 or not 0 < config.test_fraction < 1:
        problems.append("--val-fraction and --test-fraction must be in (0, 1)")
    if config.lr <= 0:
        problems.append("--lr must be positive")
    if config.unfreeze != "all" and not (config.unfreeze.isdigit() and 0 <= int(config.unfreeze) <= 4):
        problems.append(f"--unfreeze must be 0..4 or 'all', got {config.unfreeze!r}")
    try:
        if any(size < 1 for size in config.hidden_sizes):
            problems.append(f"--hidden sizes must be at least 1 (empty for one linear layer), got {config.hidden!r}")
    except ValueError:
        problems.append(f"--hidden must be comma-separated integers, got {config.hidden!r}")
    if not 0 <= config.dropout < 1:
        problems.append(f"--dropout must be in [0, 1), got {config.dropout}")
    if config.grad_clip < 0:
        problems.append(f"--grad-clip must be >= 0 (0: off), got {config.grad_clip}")
    if config.weight_decay < 0 or config.trunk_lr_mult < 0:
        problems.append("--weight-decay and --trunk-lr-mult must be >= 0")
    if config.lr_warmup_steps < 0 or config.max_steps_per_epoch < 0:
        problems.append("--lr-warmup-steps and --max-steps-per-epoch must be >= 0")
    if config.log_every < 1:
        problems.append(f"--log-every must be at least 1 step, got {config.log_every}")
    if config.patience < 1:
        problems.append(f"--patience must be at least 1 epoch, got {config.patience}")
    if config.synthetic_patients < 1 or not 32 <= config.synthetic_size <= 4096:
        problems.append("--synthetic-patients must be >= 1 and --synthetic-size 32..4096")
    if not all(math.isfinite(value) for value in (config.lr, config.grad_clip, config.weight_decay, config.dropout)):
        problems.append("--lr, --grad-clip, --weight-decay and --dropout must be finite numbers")
    if config.workers < 0:
        problems.append("--workers must be >= 0")
    if config.output_stride not in (32, 16, 8):
        problems.append(f"--output-stride must be 32, 16 or 8, got {config.output_stride!r}")
    if not (math.isfinite(config.lse_r) and config.lse_r > 0):
        problems.append(f"--lse-r must be a positive number, got {config.lse_r!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def parse_config(argv: Sequence[str] | None = None, description: str | None = None) -> Config:
    """Parse command-line flags (and --config) into a Config."""
    return config_from_args(build_parser(description).parse_args(argv))
