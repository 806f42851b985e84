"""A llama.cpp server (xllamacpp, from PyPI: no compiling) in its own process.

    python -m decision_platform.explain.llama_server --model smollm2 --threads 1 [--port 0]

It prints ``LISTENING http://127.0.0.1:PORT`` once the model is loaded, then serves llama.cpp's
OpenAI-compatible HTTP API (``/v1/chat/completions``, ``/health``) until SIGTERM / SIGINT, or until its
parent process dies (so an embedded server never outlives the platform that started it).

Why a process and not the in-process Python API: generation holds a core for seconds, and a crash or a
stall of native code must never touch the process that answers ``/decide``. Over HTTP the platform uses
the same client as for any OpenAI-compatible server, so the embedded option is not a special case.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from decision_platform.devtools.llm_weights import model_path

READY_PREFIX = "LISTENING "


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2", help="smollm2, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b or a .gguf path"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed when ready)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for generation")
    parser.add_argument("--ctx", type=int, default=2048, help="context window (tokens)")
    parser.add_argument("--watch-parent", action="store_true", help="exit when the parent process dies")
    args = parser.parse_args(argv)

    import xllamacpp as xlc  # optional dependency: the `llm` extra

    params = xlc.CommonParams()
    params.model.path = str(model_path(args.model))
    params.n_ctx = args.ctx
    params.n_parallel = 1  # one narrative at a time: two would each get half the core and both be late
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.hostnames = [args.host]
    params.port = args.port
    params.verbosity = 0
    params.warmup = False
    server = xlc.Server(params)
    print(f"{READY_PREFIX}{server.listening_address}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    while not stop.wait(1.0):
        if args.watch_parent and os.getppid() != parent:
            break
    del server  # joins llama.cpp's threads
    time.sleep(0.05)
    sys.exit(0)


if __name__ == "__main__":
    main()
