"""``llmarket run``: a local one-shot chat with a model, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys

import trio

from node.cli.common import engine_flags, ipfs_flag, model_flag, model_store, sampling_flags, sampling_params
from node.models.resolve import resolve_model
from node.progress import TerminalProgress


def register(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="chat with a model locally, streaming the answer (try a worker's model before serving it)",
        description="Run one chat turn on a local model and stream the answer to the terminal; usage goes to "
        "stderr. Nothing touches the network unless --model is a CID that must be fetched. "
        'Example: llmarket run --temperature 0 "What is the capital of France?"',
    )
    run.add_argument("prompt", metavar="PROMPT", help="the user message; '-' reads it from stdin")
    run.add_argument("--system", metavar="TEXT", help="a system message to put first")
    run.add_argument("--raw", action="store_true", help="plain text completion of PROMPT, without the chat template")
    model_flag(run)
    sampling_flags(run)
    engine_flags(run)
    ipfs_flag(run)
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from node.inference.engine import Finished, open_engine  # llama.cpp only for the commands that run a model

    params = sampling_params(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    entry = resolve_model(model_store(args), args.model, progress=TerminalProgress())
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]

    async def chat() -> Finished:
        async with open_engine(
            entry.path, n_ctx=args.ctx_size, threads=args.threads, gpu_layers=args.gpu_layers, kind=args.engine
        ) as engine:
            stream = engine.stream_completion(prompt, params) if args.raw else engine.stream_chat(messages, params)
            async with stream as events:
                async for event in events:
                    if isinstance(event, Finished):
                        return event
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
        raise AssertionError("no Finished event")

    done = trio.run(chat)
    tokens_per_s = done.usage.completion_tokens / done.elapsed_s if done.elapsed_s else 0.0
    print(file=sys.stdout)
    print(
        f"[{entry.name}: {done.usage.prompt_tokens} prompt + {done.usage.completion_tokens} completion tokens, "
        f"{tokens_per_s:.0f} tokens/s, first token {1000 * (done.first_token_s or 0):.0f} ms, "
        f"finish: {done.finish_reason}]",
        file=sys.stderr,
    )
    return 0
