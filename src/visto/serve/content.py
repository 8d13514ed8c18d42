"""From OpenAI messages to visto's `Turn`s and images, with every untrusted byte bounded.

    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
                                  {"type": "text", "text": "How many?"}]}]
    -> turns [Turn("user", "<image>\\nHow many?")], images [<PIL RGB>]

Parts of one message are joined with newlines, an image part becoming the `<image>`
placeholder at its place (LLaVA's "<image>\\nquestion" when the image comes first). An
assistant's tool_calls and the tool messages answering them become the chat template's call and
result text (data/tool_calls.py); each call is answered, by id, right after the message that
made it, as OpenAI requires.

Images arrive as base64 `data:` URLs; http(s) URLs are fetched only when the server was started with
--allow-remote-images, and only from hosts in --allowed-hosts (a server that fetches any URL
a client names can be made to probe the network it sits in).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image

from visto.data.images import BadImage, open_image
from visto.data.sample import IMAGE_PLACEHOLDER, Turn
from visto.data.tokenizer import boxes_to_loc
from visto.data.tool_calls import assistant_turn, tool_result_turn
from visto.serve.errors import APIError
from visto.serve.schemas import ImagePart, Message, TextPart


@dataclass(frozen=True)
class ImagePolicy:
    max_images: int = 8  # per request, over all messages
    max_bytes: int = 10 * 1024 * 1024  # encoded bytes per image
    max_pixels: int = 16_000_000  # width * height per image, checked before decoding
    allow_remote: bool = False
    allowed_hosts: tuple[str, ...] = ()
    fetch_timeout_s: float = 10.0


REMOTE_HINT = (
    "send the image inline as a base64 data: URL (data:image/png;base64,...), or start the "
    "server with --allow-remote-images --allowed-hosts HOST[,HOST...]"
)


def decode_data_url(url: str, policy: ImagePolicy, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:"):
        raise APIError(400, "a data: URL must look like data:image/png;base64,<data>", param)
    if not header.endswith(";base64"):
        raise APIError(400, "image data: URLs must be base64-encoded (data:image/...;base64,...)", param)
    # Base64 is 4 characters per 3 bytes: refuse an oversized image before decoding it.
    if len(payload) * 3 // 4 > policy.max_bytes + 3:
        raise APIError(
            400, f"the image is larger than the limit of {policy.max_bytes:,} bytes", param,
            "image_too_large",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the image data: URL is not valid base64", param) from None


def fetch_remote(url: str, policy: ImagePolicy, param: str) -> bytes:
    if not policy.allow_remote:
        raise APIError(400, f"remote image URLs are disabled on this server; {REMOTE_HINT}", param,
                       "remote_images_disabled")
    host = urlsplit(url).hostname or ""
    if host not in policy.allowed_hosts:
        raise APIError(
            400,
            f"image host {host!r} is not allowed; the server allows {list(policy.allowed_hosts)} "
            "(--allowed-hosts)",
            param,
            "image_host_not_allowed",
        )
    import httpx

    chunks, size = [], 0
    try:
        # No redirects: a redirect could lead to a host outside the allow-list.
        with httpx.stream("GET", url, timeout=policy.fetch_timeout_s, follow_redirects=False) as r:
            if r.status_code != 200:
                raise APIError(400, f"fetching the image gave HTTP {r.status_code}", param)
            for chunk in r.iter_bytes():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise APIError(
                        400, f"the image is larger than the limit of {policy.max_bytes:,} bytes",
                        param, "image_too_large",
                    )
                chunks.append(chunk)
    except httpx.HTTPError as e:
        raise APIError(400, f"could not fetch the image: {e}", param) from None
    return b"".join(chunks)


def load_image(url: str, policy: ImagePolicy, param: str) -> Image.Image:
    """One image_url to an RGB image, or an APIError naming the part at `param`."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_url(url, policy, param)
    elif scheme in ("http", "https"):
        data = fetch_remote(url, policy, param)
    else:
        raise APIError(400, f"unsupported image URL (scheme {scheme or 'none'!r}); {REMOTE_HINT}", param)
    try:
        return open_image(data, max_bytes=policy.max_bytes, max_pixels=policy.max_pixels)
    except BadImage as e:
        raise APIError(400, f"bad image: {e}", param, "invalid_image") from None


def _check_text(text: str, param: str) -> str:
    if IMAGE_PLACEHOLDER in text:
        raise APIError(
            400,
            f"text may not contain the literal {IMAGE_PLACEHOLDER!r}; send images as "
            '{"type": "image_url"} parts',
            param,
        )
    return text


def messages_to_turns(
    messages: list[Message], policy: ImagePolicy, loc_bins: int = 0
) -> tuple[list[Turn], list[Image.Image]]:
    """The conversation as turns with `<image>` placeholders, and its images in order. With
    `loc_bins` (a model with location tokens), the boxes users write ("[x1, y1, x2, y2]",
    0..999, as the server's answers give them) become the model's location tokens, as its
    training and `visto eval` write them; tool calls and results are left as they are."""
    n_images = sum(
        1
        for m in messages
        if isinstance(m.content, list)
        for part in m.content
        if isinstance(part, ImagePart)
    )
    if n_images > policy.max_images:
        raise APIError(
            400,
            f"the request has {n_images} images; this server accepts at most {policy.max_images}",
            "messages",
            "too_many_images",
        )
    turns, images = [], []
    pending: dict[str, int] = {}  # tool call id -> the message that made it, until answered
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if pending and role != "tool":
            raise APIError(400, f"messages[{i}]: the tool calls {sorted(pending)} of messages"
                           f"[{min(pending.values())}] have no answer; send one "
                           '{"role": "tool", "tool_call_id": ID, "content": ...} per call right '
                           "after the assistant message that made them", f"messages[{i}]")  # fmt: skip
        if role == "tool":
            turns.append(tool_result_turn(_tool_result(message, i, pending)))
            continue
        if message.content is None or isinstance(message.content, str):
            text = _check_text(message.content or "", f"messages[{i}].content")
        else:
            pieces = []
            for j, part in enumerate(message.content):
                param = f"messages[{i}].content[{j}]"
                if isinstance(part, TextPart):
                    pieces.append(_check_text(part.text, param))
                else:
                    images.append(load_image(part.image_url.url, policy, param + ".image_url"))
                    pieces.append(IMAGE_PLACEHOLDER)
            text = "\n".join(pieces)
        if loc_bins:
            text = boxes_to_loc(text, loc_bins)
        if message.tool_calls and role != "assistant":
            raise APIError(400, f"messages[{i}] is a {role} message; only assistant messages carry "
                           "tool_calls", f"messages[{i}].tool_calls")  # fmt: skip
        if message.tool_calls:
            calls = []
            for j, call in enumerate(message.tool_calls):
                param = f"messages[{i}].tool_calls[{j}]"
                if call.id in pending:
                    raise APIError(400, f"{param}: the call id {call.id!r} is used twice",
                                   param + ".id")  # fmt: skip
                pending[call.id] = i
                calls.append((call.function.name,
                              _check_text(call.function.arguments, param + ".function.arguments")))  # fmt: skip
            turns.append(assistant_turn(text, calls))
        else:
            turns.append(Turn(role, text))
    if pending:
        raise APIError(400, f"the tool calls {sorted(pending)} of messages[{min(pending.values())}] "
                       "have no answer; send one tool message per call after it",
                       "messages")  # fmt: skip
    if not any(t.role == "user" for t in turns):
        raise APIError(400, "the conversation needs at least one user message", "messages")
    return turns, images


def _tool_result(message: Message, i: int, pending: dict[str, int]) -> str:
    """A tool message's text, once its tool_call_id is known to answer an open call."""
    if message.tool_call_id is None:
        raise APIError(400, f"messages[{i}] is a tool message without tool_call_id: give the id "
                       "of the call it answers", f"messages[{i}].tool_call_id")  # fmt: skip
    if pending.pop(message.tool_call_id, None) is None:
        raise APIError(400, f"messages[{i}] answers the tool call {message.tool_call_id!r}, but "
                       "no assistant message right before it made a call with that id (a tool "
                       "message follows the assistant message whose tool_calls it answers)",
                       f"messages[{i}].tool_call_id", "tool_call_not_found")  # fmt: skip
    if message.content is None or isinstance(message.content, str):
        return _check_text(message.content or "", f"messages[{i}].content")
    texts = []
    for j, part in enumerate(message.content):
        if not isinstance(part, TextPart):
            raise APIError(400, f"messages[{i}].content[{j}]: a tool result is text; images go in "
                           "user messages", f"messages[{i}].content[{j}]")  # fmt: skip
        texts.append(_check_text(part.text, f"messages[{i}].content[{j}]"))
    return "\n".join(texts)


def embedding_inputs(
    items: str | list, policy: ImagePolicy
) -> list[tuple[str, str | Image.Image]]:
    """/v1/embeddings input -> [("text", str) | ("image", PIL)] in request order."""
    if isinstance(items, str):
        items = [items]
    if not items:
        raise APIError(400, "input is empty: give a text or a list of texts/images", "input")
    n_images = sum(isinstance(x, ImagePart) for x in items)
    if n_images > policy.max_images:
        raise APIError(
            400, f"{n_images} images in one request; the limit is {policy.max_images}", "input",
            "too_many_images",
        )
    out: list[tuple[str, str | Image.Image]] = []
    for j, item in enumerate(items):
        if isinstance(item, str):
            out.append(("text", item))
        elif isinstance(item, TextPart):
            out.append(("text", item.text))
        else:
            out.append(("image", load_image(item.image_url.url, policy, f"input[{j}].image_url")))
    for j, (kind, value) in enumerate(out):
        if kind == "text" and not str(value).strip():
            raise APIError(400, f"input[{j}] is an empty text", f"input[{j}]")
    return out
