"""`sae-stream` command line: the composition root, the only place that wires LM, buffer, trainer and eval.

    sae-stream run [CONFIG] [--out RUN_DIR]                 text -> LM -> streamed SAE -> eval -> dashboard
    sae-stream lm train [CONFIG] --out DIR                  train the one-layer GPT
    sae-stream lm train --resume DIR                        continue an interrupted one
    sae-stream train CONFIG --lm PATH_OR_NAME [--out RUN_DIR]
    sae-stream train --resume RUN_DIR
    sae-stream eval RUN_DIR          sae-stream analyze RUN_DIR
    sae-stream compare A B [--out DIR]                      match two SAEs' features (decoders, activations)
    sae-stream steer RUN_DIR --feature N[,M..] [--value 5x] sample with features pinned (feature steering)
    sae-stream features RUN_DIR --text TEXT [--k 5]         the most active features of each token of a text
    sae-stream tokenize [CONFIG] --out DIR                  data.source -> parquet shards of token ids
    sae-stream tokenize --resume DIR                        continue an interrupted tokenize
    sae-stream hooks --lm PATH_OR_NAME                      list hook points
    sae-stream config                                       every config field with its help

Every command accepts `--section.field=value` overrides. Bad input exits 2 with one line (`--debug`, anywhere on
the line: with the traceback).
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback
import warnings
from collections.abc import Sequence

from sae_stream import compare, lm_bridge, pipeline, report
from sae_stream.checkpoint import CheckpointError
from sae_stream.config import ConfigError, help_text
from sae_stream.process import TrainingInterrupted
from sae_stream.rundir import UserError, is_main_process, resume_command

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as our one line (its own are the usage block and the message): what is wrong and
    where the command's options are listed. Subcommands' parsers are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"sae-stream: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sae-stream", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Config overrides: --section.field=value (see `sae-stream config`).")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the main job: train LM (unless --lm), stream its MLP into an SAE, eval, analyze")
    run.add_argument("config", nargs="?", help="YAML config (default: the embedded default, configs/default.yaml)")
    run.add_argument("--lm", help="use this trained LM (run dir or transformer-lens name) instead of training one")
    _add_out(run)
    run.add_argument("--skip-analyze", action="store_true", help="skip the HTML dashboard")

    lm = sub.add_parser("lm", help="language-model commands")
    lm_sub = lm.add_subparsers(dest="lm_command", required=True)
    lm_train = lm_sub.add_parser("train", help="train the one-layer GPT")
    lm_train.add_argument("config", nargs="?", help="YAML config (default: the embedded default, configs/default.yaml)")
    _add_out(lm_train)
    lm_train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out "
                          "(or `lm train --resume DIR`)")

    train = sub.add_parser("train", help="train an SAE on a streamed LM hook")
    train.add_argument("config", nargs="?", help="YAML config")
    train.add_argument("--lm", help="trained LM: run dir of `sae-stream lm train` or a transformer-lens name")
    _add_out(train)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")

    _add_study_commands(sub)
    tok = sub.add_parser("tokenize", help="tokenize data.source once into parquet shards of token ids (fast training "
                         "input: --data.source=DIR --data.text_field=input_ids)")
    tok.add_argument("config", nargs="?", help="YAML config whose data section to read (default: the embedded default)")
    _add_out(tok)
    tok.add_argument("--shard-tokens", type=int, default=None, help="tokens per parquet file (default 50M)")
    tok.add_argument("--resume", metavar="DIR", help="continue the interrupted tokenize in DIR (its saved config)")
    hooks = sub.add_parser("hooks", help="list the hook points of an LM")
    hooks.add_argument("--lm", required=True)
    cfg = sub.add_parser("config", help="print every config field with its type, default and help")
    cfg.add_argument("--markdown", action="store_true", help="as markdown tables (the README's config reference)")
    return p


def _add_study_commands(sub: argparse._SubParsersAction) -> None:
    """The commands that read a trained run: eval, analyze, compare, steer, features."""
    ev = sub.add_parser("eval", help="evaluate a trained SAE run (eval.json, density PNG)")
    ev.add_argument("run_dir")
    an = sub.add_parser("analyze", help="build the HTML feature dashboard of a run")
    an.add_argument("run_dir")
    an.add_argument("--features", help="comma-separated feature ids, e.g. 12,40,301: a dashboard of those in "
                    "RUN_DIR/dashboard-features/ (replaced by the next one), the run's dashboard/ left as it is "
                    "(default: dashboard/ of analysis.features spread over the densities)")
    cmp = sub.add_parser("compare", help="match the features of two SAEs (decoder cosine, activation correlation)")
    cmp.add_argument("a", help="run directory (or a sweep's RUN_DIR/<name>, or a SAELens SAE directory)")
    cmp.add_argument("b", help="the SAE to compare it with, the same kinds")
    _add_out(cmp)
    cmp.add_argument("--tokens", type=int, help="held-out tokens for the correlations (default: eval.tokens)")
    cmp.add_argument("--no-correlation", action="store_true", help="decoder cosines only: no LM forward")
    st = sub.add_parser("steer", help="sample from the LM with SAE features pinned (feature steering)")
    st.add_argument("run_dir")
    st.add_argument("--feature", required=True, help="the feature id, or ids separated by commas (pinned together)")
    st.add_argument("--value", default="5x", help="its pinned activation: a number, or Nx for N times its largest "
                    "activation on held-out text (default 5x); 0 ablates it; one for all features or one each, "
                    "separated by commas")
    st.add_argument("--prompt", default="", help="text to continue (default: none, a document's start)")
    st.add_argument("--tokens", type=int, default=40, help="tokens sampled per sample (default 40)")
    st.add_argument("--samples", type=int, default=3, help="samples, clean and pinned each (default 3)")
    st.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0: greedy (default 1)")
    st.add_argument("--seed", type=int, default=0, help="sampling seed, the same for clean and pinned (default 0)")
    ft = sub.add_parser("features", help="the most active SAE features at each token of a text")
    ft.add_argument("run_dir")
    ft.add_argument("--text", required=True, help="the text (read after an end-of-text token, as in training)")
    ft.add_argument("--k", type=int, default=5, help="features shown per token (default 5)")


def _feature_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--features {text!r}: give feature ids separated by commas, e.g. 12,40,301") from None
    if not ids:
        raise UserError("--features names no feature: give ids separated by commas, e.g. 12,40,301")
    return list(dict.fromkeys(ids))  # (each once, in the order given)


def _pins(feature: str, value: str) -> tuple[int | list[int], str | list[str]]:
    """`steer`'s --feature and --value: one id and value, or comma lists (a list of ids pins them together)."""
    parts = [part.strip() for part in feature.split(",")]
    if not all(part.lstrip("-").isdigit() for part in parts):
        raise UserError(f"--feature {feature!r}: give a feature id, or ids separated by commas, e.g. 12 or 12,40")
    ids, values = [int(part) for part in parts], [part.strip() for part in value.split(",")]
    return ids if len(ids) > 1 else ids[0], values if len(values) > 1 else values[0]


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output directory (default: runs/<command>-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    return f"sae-stream: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # (taken anywhere: before the command, as argparse wants, or after it)
    argv = [a for a in argv if a != "--debug"]
    try:
        argv = _join_override_values(argv)
    except ConfigError as e:
        return _fail(str(e), debug)
    # `--section.field=value` overrides bypass argparse, which takes any argument with a space for a positional
    # (`--sweep.saes=[{name: a, sae: {l1_coeff: 1e-4}}]`)
    given = [a for a in argv if a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]]
    args, overrides = _parser().parse_known_args([a for a in argv if a not in given])
    args.debug, overrides = debug, [*given, *overrides]
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return _dispatch(args, overrides)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, UserError, CheckpointError) as e:
        return _fail(str(e), args.debug)
    except BrokenPipeError:  # output piped into `head` (before OSError, its base class)
        return 0
    except OSError as e:
        if e.errno == errno.ENOSPC:
            return _fail(f"disk full while writing {e.filename or 'a file'}: free space and {_again(args)}",
                         args.debug)
        if e.errno in _USER_ERRNOS:  # a path the user gave: read-only, not allowed, missing, not a directory
            where = f" {e.filename!s}" if e.filename else ""
            return _fail(f"cannot write or read{where}: {e.strerror or e}; fix the path or its permissions, then "
                         f"{_again(args)}", args.debug)
        raise
    except TrainingInterrupted as e:  # the step in flight finished and was checkpointed (on every rank: told once)
        if is_main_process():
            where = e.run_dir if e.run_dir is not None else "RUN_DIR"
            print(f"sae-stream: {e}, checkpoint saved; continue with: {e.command or resume_command(where)}",
                  file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("sae-stream: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


def _join_override_values(argv: list[str]) -> list[str]:
    """`--section.field value` -> `--section.field=value` (else argparse would take the value for the config
    path); an override with no value is a one-line error naming it."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" not in arg and "." in arg:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR}


def _again(args: argparse.Namespace) -> str:
    """What to do after freeing space: resume a training run (its checkpoints are kept), or run the command again."""
    if args.command in ("train", "run"):
        run_dir = getattr(args, "resume", None) or getattr(args, "out", None) or "RUN_DIR"
        return (f"resume with `{resume_command(run_dir)}` if it had begun training (its checkpoints are kept, no "
                "partial one is left), else run the command again (with --overwrite if it made the directory)")
    return "run the command again"


def _fail(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"sae-stream: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _dispatch(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.command in ("config", "hooks") and overrides:  # (they read no config: an override would do nothing)
        what = "config overrides" if overrides[0].startswith("--") else "config file or other argument"
        raise UserError(f"`sae-stream {args.command}` takes no {what} ({overrides[0]}): it prints "
                        f"{'every field' if args.command == 'config' else 'the hooks'}; a config file goes to run, "
                        "train, lm train or tokenize, overrides to those and to eval or analyze")
    if args.command == "config":
        print(help_text(markdown=args.markdown))
        return 0
    if args.command == "hooks":
        print("\n".join(lm_bridge.list_hooks(args.lm)))
        return 0
    if args.command == "lm":
        pipeline.lm_train(args.config, overrides, args.out, resume=args.resume, overwrite=args.overwrite)
        return 0
    if args.command == "train":
        if args.resume:
            if args.config or overrides:
                raise UserError("--resume RUN_DIR takes no config or overrides: the run's config.yaml is used")
            ignored = [f for f, v in (("--out", args.out), ("--lm", args.lm), ("--overwrite", args.overwrite)) if v]
            if ignored:
                raise UserError(f"--resume RUN_DIR continues that run in place with its own LM: drop "
                                         f"{', '.join(ignored)}")
            pipeline.train_resume(args.resume)
        else:
            pipeline.train(args.config, overrides, lm=args.lm, out=args.out, overwrite=args.overwrite)
        return 0
    if args.command == "eval":
        report.evaluate_run(args.run_dir, overrides)
        return 0
    if args.command == "analyze":
        features = _feature_ids(args.features) if args.features is not None else None
        report.analyze_run(args.run_dir, overrides, features=features)
        return 0
    if args.command == "compare":
        compare.compare_runs(args.a, args.b, overrides, out=args.out, overwrite=args.overwrite,
                             correlation=not args.no_correlation, tokens=args.tokens)
        return 0
    if args.command == "steer":
        from sae_stream.trained import print_steering

        print_steering(args.run_dir, overrides, *_pins(args.feature, args.value), args.prompt, args.tokens,
                       args.samples, args.temperature, args.seed)
        return 0
    if args.command == "features":
        from sae_stream.trained import print_features

        print_features(args.run_dir, overrides, args.text, args.k)
        return 0
    if args.command == "tokenize":
        _tokenize(args, overrides)
        return 0
    if args.command == "run":
        pipeline.run(args.config, overrides, lm=args.lm, out=args.out, overwrite=args.overwrite,
                     analyze=not args.skip_analyze)
        return 0
    raise AssertionError(args.command)


def _tokenize(args: argparse.Namespace, overrides: list[str]) -> None:
    from sae_stream.pretokenize import SHARD_TOKENS, resume_tokenize, tokenize_source

    if args.resume:
        given = [f for f, v in (("CONFIG", args.config), ("overrides", overrides), ("--out", args.out),
                                ("--overwrite", args.overwrite), ("--shard-tokens", args.shard_tokens is not None))
                 if v]
        if given:
            raise UserError(f"--resume DIR continues that tokenize with its saved settings: drop {', '.join(given)}")
        resume_tokenize(args.resume)
    else:
        shard_tokens = SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens
        tokenize_source(args.config, overrides, args.out, args.overwrite, shard_tokens)
