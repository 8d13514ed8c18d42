"""Request bodies of the OpenAI-compatible API, as strict pydantic models.

Strict: a number sent as a string, a bool sent as 0/1 or a list where a string belongs is a
400 naming the field, never a silent coercion. Fields the API does not know are ignored
(clients send many optional ones), fields that would change the answer and that visto cannot
honour (logprobs) are refused in `app.py` with a message.

Responses are built as plain dicts in `app.py`, following OpenAI's chat.completion,
chat.completion.chunk, list (embeddings, models) shapes field for field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class ImageURL(Strict):
    url: str = Field(description="data:image/png;base64,... (or http(s) when the server allows)")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="accepted for compatibility; every image is processed the same way"
    )


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(Strict):
    name: str
    arguments: str = Field(description="the arguments as a JSON object in a string")


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: the calls it made")
    tool_call_id: str | None = Field(None, description="tool: the call this message answers")


class FunctionDefinition(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema object")
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class StreamOptions(Strict):
    include_usage: bool = False


class JSONSchemaFormat(Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="wins over max_tokens")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # Accepted only at their neutral values (see app.py): clients send them by default.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    tools: list[Tool] | None = None
    # "none" | "auto" | "required" | NamedToolChoice, checked in serve/tools.py (one clear message)
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    # vLLM's extension: generate max_tokens tokens, never stopping at end-of-turn (benchmarks).
    ignore_eos: bool = False


class EmbeddingRequest(Strict):
    model: str
    input: str | list[str | ContentPart] = Field(
        description="a text, or a list of texts and {type: text | image_url} parts"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class SearchRequest(Strict):
    query: str | None = Field(None, description="text query (or give image_url)")
    image_url: str | None = Field(None, description="query image as a data: URL")
    k: int = Field(5, ge=1, le=100)
    thumbnails: bool = Field(False, description="add a small PNG data: URL to each hit")
