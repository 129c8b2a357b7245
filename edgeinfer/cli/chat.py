"""edgeinfer chat [-m MODEL_DIR]: an interactive chat in the terminal.

One ChatSession for the whole run: each turn prefills only its own tokens. /reset
starts over, /exit (or Ctrl-D) quits, Ctrl-C stops the answer being written and keeps
the conversation.
"""
from __future__ import annotations

import sys

from edgeinfer.cli.args import add_max_new_tokens, add_model, add_threads, add_verify
from edgeinfer.runtime.options import DEFAULT_VERIFY, MODES, RuntimeOptions
from edgeinfer.runtime.sampling import DEFAULT_MAX_TOKENS

HELP = "/reset: start over   /exit or Ctrl-D: quit   Ctrl-C: stop the answer"
CHAT_MAX_TOKENS = max(DEFAULT_MAX_TOKENS, 256)   # a chat answer is longer than a completion test


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (default model: the built-in demo)",
                       description="Chat with a model using its chat template, keeping the KV cache across "
                                   "turns. " + HELP)
    add_model(p, positional=False)
    add_max_new_tokens(p, CHAT_MAX_TOKENS, "answer with at most N tokens per turn")
    p.add_argument("-s", "--system", default=None, help="system message that opens the conversation")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the model's generation_config, else greedy)")
    p.add_argument("--top-k", type=int, default=None, help="0 = off (default: the model's, else off)")
    p.add_argument("--top-p", type=float, default=None, help="1 = off (default: the model's, else off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="1 = off (default: the model's, else off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--memory-budget", default=None, help="e.g. 40%%, 300MB, 2GB")
    p.add_argument("--mode", default=RuntimeOptions.mode, choices=MODES,
                   help="auto: resident if the model fits the budget, else stream FFN neurons / experts")
    add_threads(p)
    add_verify(p, DEFAULT_VERIFY, "checksum weight files at load")
    p.set_defaults(handler=run)


def run(args, stdin=None, stdout=None) -> int:
    import warnings

    import edgeinfer
    from edgeinfer.errors import ChatTemplateWarning, EdgeInferError
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model = edgeinfer.load(args.model, memory_budget=args.memory_budget, threads=args.threads, verify=args.verify,
                           mode=args.mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ChatTemplateWarning)
        session = model.start_chat(system=args.system)
    for w in caught:
        print(f"edgeinfer: {w.message}", file=sys.stderr)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    interactive = stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        try:
            # input() gives line editing on a terminal; a pipe is read line by line.
            text = input("> ") if interactive and stdin is sys.stdin else stdin.readline()
        except KeyboardInterrupt:
            stdout.write("\n")
            continue
        except EOFError:
            text = ""
        if not text:            # Ctrl-D / end of input
            stdout.write("\n" if interactive else "")
            return 0
        text = text.rstrip("\n")
        command = text.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            print("[conversation reset]", file=sys.stderr)
            continue
        if not command:
            continue
        try:
            steps = session.send(text, stream=True, **sampling)
        except EdgeInferError as exc:
            # A refused turn (context full, template error) leaves the session usable.
            print(f"edgeinfer: error: {exc}", file=sys.stderr)
            continue
        try:
            for step in steps:
                stdout.write(step.text)
                stdout.flush()
        except KeyboardInterrupt:
            steps.close()
            stdout.write(" [stopped]")
        stdout.write("\n")
        stdout.flush()
