"""TEMPORARY device-machine measurements for the lm helper; deleted after use."""
import json
import shutil
import sys
import time

import torch

import lm.model as M
from sae_stream.config import LMConfig, config_from_dict


def cpu_step(T: int, B: int, rounds: int, nt: int) -> None:
    torch.set_num_threads(nt)
    torch.manual_seed(0)
    g = M.GPT(LMConfig(d_model=128, n_heads=4, d_mlp=512, n_ctx=1024, vocab_size=50304))
    opt = torch.optim.AdamW(g.parameters(), lr=1e-3)
    x = torch.randint(0, 50257, (B, T + 1))

    def step(bf, chunk):
        if chunk:
            M.chunked_cross_entropy.__defaults__ = (chunk,)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf):
            _, loss = g(x[:, :-1], x[:, 1:], return_logits=not chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = {}
    variants = [(False, 0), (True, 0), (False, 64), (True, 32), (True, 64), (True, 128)]
    for r in range(rounds):
        for v in variants:
            if r == 0:
                step(*v)
            w = time.perf_counter()
            step(*v)
            res.setdefault(v, []).append(time.perf_counter() - w)
    for (bf, ch), v in res.items():
        ce = f"chunked{ch}" if ch else "standard"
        print(json.dumps({"threads": nt, "autocast": "bf16" if bf else "fp32", "ce": ce,
                          "T": T, "B": B, "best_tok_s": round(B * T / min(v))}), flush=True)


def sweep() -> None:
    """Held-out loss after CPU-budget token counts (GPU: same maths, seconds instead of minutes)."""
    from lm.train import train_lm
    from sae_stream.tracking import NullTracker

    for tokens in (393216, 524288, 655360):
        for B in (8, 16):
            for lr in (0.001, 0.002, 0.003):
                cfg = config_from_dict({"data": {"tokenizer": "gpt2", "context_len": 128},
                                        "lm_train": {"batch_size": B, "tokens": tokens, "eval_every": 10**6, "lr": lr,
                                                     "warmup_steps": 20, "checkpoint_every": 10**6},
                                        "train": {"device": "cuda"}})
                shutil.rmtree("/tmp/sweep", ignore_errors=True)
                r = train_lm(cfg, "/tmp/sweep", tracker=NullTracker())
                print(json.dumps({"tokens": tokens, "B": B, "lr": lr, "heldout": round(r["heldout_loss"], 4),
                                  "unigram": round(r["unigram_loss"], 4), "s": r["wall_time_s"]}), flush=True)


def gpu_train(B: int, tokens: int, compile: bool) -> None:
    from lm.train import train_lm
    from sae_stream.tracking import NullTracker

    cfg = config_from_dict({"data": {"tokenizer": "gpt2", "context_len": 128},
                            "lm_train": {"batch_size": B, "tokens": tokens, "eval_every": 10**6, "eval_tokens": 32768,
                                         "checkpoint_every": 10**6, "compile": compile, "warmup_steps": 50,
                                         "log_every": 50},
                            "train": {"device": "cuda"}})
    out = f"/tmp/gpu_lm_{B}_{compile}"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    rates = []

    class Rates(NullTracker):
        def log(self, step, metrics):
            if "lm/tokens_per_s" in metrics:
                rates.append(metrics["lm/tokens_per_s"])

    r = train_lm(cfg, out, tracker=Rates())
    steady = sorted(rates[len(rates) // 2:])
    r.update(total_s=round(time.perf_counter() - t, 1), batch_size=B, compile=compile,
             steady_tok_s=round(steady[len(steady) // 2]))
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "cpu_step":
        cpu_step(*map(int, sys.argv[2:6]))
    elif sys.argv[1] == "sweep":
        sweep()
    else:
        gpu_train(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
