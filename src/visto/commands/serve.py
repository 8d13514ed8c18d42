"""`visto serve`: the OpenAI-compatible HTTP API and the web page."""

from __future__ import annotations

import argparse
from pathlib import Path

from visto.commands._common import add_command, load_for_inference
from visto.errors import UserError

ORDER = 70

DESCRIPTION = """\
Serve models over an OpenAI-compatible HTTP API, with a web page at /.

  POST /v1/chat/completions   chat with images (data: URLs), streaming, n, seed, stop,
                              response_format json_object (a JSON object) / json_schema
                              (always valid JSON: it closes within max_tokens, and a max_tokens too small to close
                              it at all is a 400), tools / tool_choice (function calling: a
                              call's arguments are decoded under its tool's JSON schema, and
                              close within max_tokens the same way)
  POST /v1/embeddings         texts and images -> vectors (needs --clip)
  POST /v1/search             text or image -> the closest images of an index (needs --db)
  GET  /v1/models, /health, /metrics (Prometheus), /docs (the API schema)

Any OpenAI client works: point its base_url at http://HOST:PORT/v1.
Requests arriving together are batched into one generation (--max-batch, --batch-wait-ms).
Beyond --max-concurrency requests in flight, up to --max-queue more wait in line (first come,
first served); beyond that the server answers 429 with Retry-After.
Remote image URLs are refused unless --allow-remote-images and the host is in --allowed-hosts.
--tools offers the server's own experts to the model beside the client's tools; when the model
calls one, the server runs it on the conversation's latest image, gives the model the result and
lets it answer (the runs are listed in the choice's `tool_runs`). Built-in: ocr (PP-OCRv4),
segment and detect (a clipseg checkpoint: visto train --recipe clipseg-synth). The web page
lists each call with its result and draws the masks and boxes the tools return on the image.
--quote-results: the answer after a tool result that holds text (a client's `role: tool`
message, or the result of one of --tools) is made of that result's words, as `visto chat
--quote-results` makes it (visto.tools.quote): auto (default) for a request that asks what
`visto chat --task ocr` asks ("Read all the text in the image."), always, or never; each
choice says whether its answer quoted: "quoted": true/false (visto's extension, as `boxes` and
`tool_runs`: the openai SDK keeps it in choice.model_extra; the web page marks it).

Examples:
  visto serve --model runs/llava/checkpoint
  visto serve --model runs/llava/checkpoint --clip runs/clip/checkpoint --db runs/index
  visto serve --clip runs/clip/checkpoint --db runs/index --port 9000 --api-key secret
  visto serve --model runs/llava/checkpoint --int8          (int8 chat model on the CPU)
  visto serve --model runs/llava/checkpoint --tools ocr     (the model may read text with OCR)
  visto serve --model ckpt --tools ocr,my_pkg.tools:brightness   (and a visto.tools.Tool of yours)
  visto serve --model runs/llava/checkpoint --tools ocr,segment,detect
      (masks and boxes: runs/clipseg-synth/checkpoint; open http://127.0.0.1:8000/, choose
      an image, pick "tools: call segment" and ask "Cut out the red star.")
  visto serve --model ckpt --tools segment=runs/seg/checkpoint,detect=runs/seg/checkpoint
  visto serve --model runs/quickstart/checkpoint --tools ocr --quote-results always
      (after an OCR result, "What does the label say?" is answered with the result's words;
      a client's own tool results sent back as role "tool" messages are quoted the same way)
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "llava", "messages": [{"role": "user", "content": "hello"}]}'
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "serve", "OpenAI-compatible API server and web page", DESCRIPTION)
    p.add_argument("--model", type=Path, help="generative checkpoint (e.g. LLaVA) for chat")
    p.add_argument("--clip", type=Path, help="two-tower checkpoint for /v1/embeddings and search")
    p.add_argument("--db", type=Path, help="index directory (visto index build) for /v1/search")
    p.add_argument("--name", help="model id for chat (default: the checkpoint's run name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-concurrency", type=int, default=32,
                   help="chat requests in flight at once; more wait in line (default 32)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="chat requests waiting in line for a slot before 429 (default 64)")
    p.add_argument("--max-batch", type=int, default=8, help="rows per batched generation (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests (default 5 ms)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds per chat request, waiting in line included, before 504 "
                   "(default 120)")
    p.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (only from --allowed-hosts)")
    p.add_argument("--allowed-hosts", default="",
                   help="comma-separated host names remote images may come from")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--int8", action="store_true",
                   help="run the chat model's Linear layers in int8 (CPU only: a quarter of "
                   "their memory, faster decoding; answers may differ slightly from fp32)")
    p.add_argument("--tools", metavar="NAMES",
                   help="tools the server runs itself when the model calls them: built-in names "
                   "(ocr, segment, detect; segment=CKPT / detect=CKPT for your clipseg "
                   "checkpoint) and module:attribute of your visto.tools.Tool, comma-separated")
    p.add_argument("--quote-results", choices=("auto", "always", "never"), default="auto",
                   help="the answer after a tool result that holds text (a client's role "
                   "\"tool\" message, or a result of --tools) is made of that result's words "
                   "(visto.tools.quote), as in visto chat: auto (default) does so for a request "
                   "that asks the OCR task's prompt (visto chat --task ocr's), where the answer "
                   "is the text; always; never (the model's own answer). Only where the answer "
                   "may be text: not under tool_choice required or a named function, a JSON "
                   "response_format or ignore_eos")  # fmt: skip
    p.set_defaults(run=run_serve)


def run_name(checkpoint: Path) -> str:
    """runs/llava/checkpoint -> "llava"; anything else -> its directory name."""
    path = checkpoint.resolve()
    return path.parent.name if path.name == "checkpoint" else path.name


def build_app(args: argparse.Namespace):
    """The FastAPI app for parsed `visto serve` arguments (also used by tests)."""
    from visto.serve import ChatModel, ImagePolicy, ServedModels, ServeSettings, create_app

    if args.model is None and args.clip is None:
        raise UserError("nothing to serve: give --model CKPT (chat) and/or --clip CKPT (embeddings)")
    hosts = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
    if hosts and not args.allow_remote_images:
        raise UserError("--allowed-hosts needs --allow-remote-images")
    if args.allow_remote_images and not hosts:
        raise UserError("--allow-remote-images needs --allowed-hosts HOST[,HOST...]")
    for name in ("max_concurrency", "max_batch", "max_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        raise UserError("--max-queue must be 0 (answer 429 as soon as the slots are full) or more")
    if args.timeout <= 0 or args.batch_wait_ms < 0:
        raise UserError("--timeout must be positive and --batch-wait-ms not negative")

    if args.int8 and args.model is None:
        raise UserError("--int8 quantizes the chat model: give --model CKPT")
    tools = None
    if args.tools:
        if args.model is None:
            raise UserError("--tools are called by the chat model: give --model CKPT")
        from visto.tools import load_tools

        tools = load_tools(args.tools)
        tools.start()  # their processes load their experts while the models load; app stops them
    chat = None
    if args.model is not None:
        model = load_for_inference(args.model, args.device, args.int8)
        chat = ChatModel.from_model(model, args.name or run_name(args.model))
    embedder = store = None
    if args.clip is not None or args.db is not None:
        from visto.index import VectorStore, load_embedder

        store = VectorStore(args.db) if args.db is not None else None
        spec = str(args.clip) if args.clip is not None else (store.model_source if store else "")
        if not spec:
            raise UserError(f"the index at {args.db} does not record its model; pass --clip CKPT")
        embedder = load_embedder(spec)
    models = ServedModels(
        chat=chat,
        embedder=embedder,
        embedder_name=run_name(Path(spec)) if embedder is not None else None,
        store=store,
        tools=tools,
    )
    settings = ServeSettings(
        api_key=args.api_key,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        timeout_s=args.timeout,
        quote_results=args.quote_results,
        images=ImagePolicy(
            max_images=args.max_images, allow_remote=args.allow_remote_images, allowed_hosts=hosts
        ),
    )
    return create_app(models, settings)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    app = build_app(args)
    print(f"visto serve: http://{args.host}:{args.port}/  (API at /v1, docs at /docs)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
