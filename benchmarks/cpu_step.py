"""The default CPU training step (Trainer, Anthropic SAE 512 -> d_sae, batch 4096, fp32, hand-written backward,
metrics every step) in tokens/s: the figure CPU changes must not lower. Compare two checkouts by running this file
with each on PYTHONPATH, alternating (one process per tree and round; best of 3 windows per size):

    git worktree add /tmp/old <commit>
    for i in 1 2 3; do for t in /tmp/old $PWD; do PYTHONPATH=$t python benchmarks/cpu_step.py --label $t \\
        --out benchmarks/results/cpu_step.jsonl; done; done

`--architectures anthropic,april,topk,batchtopk,jumprelu` measures each architecture (its defaults, λ 1e-3, k 32)
in the same process, one line each, so their costs compare within one run; `batchtopk+matryoshka` (or topk+...)
adds Matryoshka levels [d_sae / 16, d_sae / 4].
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

import sae_stream
from sae_stream.config import config_from_dict
from sae_stream.sae import build_sae
from sae_stream.tracking import NullTracker
from sae_stream.trainer import Trainer


def tokens_per_s(d_sae: int, batch: int, steps: int, architecture: str = "anthropic") -> float:
    architecture, _, variant = architecture.partition("+")
    levels = {"matryoshka": [d_sae // 16, d_sae // 4]} if variant == "matryoshka" else {}
    cfg = config_from_dict({"sae": {"architecture": architecture, "d_sae": d_sae, "l1_coeff": 1e-3, **levels},
                            "train": {"total_tokens": batch * 10**6, "batch_size": batch, "log_every": 50,
                                      "checkpoint_every": 10**9, "device": "cpu"},
                            "resample": {"enabled": False}})
    trainer = Trainer(build_sae(cfg.sae, 512, seed=0), cfg, None, NullTracker())
    x = torch.randn(batch, 512, generator=torch.Generator().manual_seed(0)).relu_()

    def window(n: int) -> float:
        trainer.total_steps = trainer.step + n
        t0 = time.perf_counter()
        trainer.fit(itertools.repeat(x))
        return time.perf_counter() - t0

    window(5)
    return batch * steps / min(window(steps) for _ in range(3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--label", default="", help="names the checkout in the output")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--architectures", default="anthropic", help="comma-separated sae.architecture values")
    p.add_argument("--out", default=None, help="also append the JSON lines here")
    args = p.parse_args()
    for architecture in args.architectures.split(","):
        torch.manual_seed(0)
        row = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "label": args.label, "package": sae_stream.__file__, "batch": args.batch}
        if architecture != "anthropic":  # (rows without the field are anthropic's, as before it existed)
            row["architecture"] = architecture
        for d_sae, steps in ((1024, 40), (4096, 12)):
            row[f"tokens_per_s_{d_sae}"] = round(tokens_per_s(d_sae, args.batch, steps, architecture))
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
