"""Hypothesis strategies for hostile HTTP requests to an OpenAI-compatible route: random
JSON, valid requests with one field mutated, wrong types, deep nesting, huge strings,
invalid UTF-8, lone surrogates, wrong or missing content types and odd headers."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

from tests.suites.protogen import BAD_UTF8, HUGE

# Every parameter either OpenAI API or our extensions names (the suite mutates each).
PARAMS = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "n", "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "logprobs", "top_logprobs", "logit_bias", "user", "tools", "tool_choice",
          "response_format", "echo", "best_of", "suffix", "ignore_eos", "stop_token_ids", "prompt_logprobs",
          "routing", "policy", "strong_share", "experiment", "prompt_template", "skip_cache", "metadata",
          "application", "parallel_tool_calls", "functions", "service_tier", "store", "modalities")
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")
FAMILIES_POST = ("json_value", "mutated", "deep_nesting", "huge_string", "invalid_utf8", "surrogate",
                 "content_type", "headers")
FAMILIES_GET = ("query", "headers")


@dataclass
class HttpInput:
    path: str
    body: bytes | None
    headers: dict[str, str]
    label: str


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(), st.booleans(),
        st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 0.5, -0.0, 1e308, float("nan"),
                         float("inf"), float("-inf"), "", "x", "auto", "user", "null", "true", "0"]),
        st.integers(), st.floats(), st.text(max_size=30),
    )
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                        max_leaves=12)


def _dumps(value: Any) -> bytes:
    # allow_nan: NaN / Infinity are what a sloppy client library sends.
    return json.dumps(value, allow_nan=True).encode()


def _headers(key: str = "k1", content_type: str = "application/json") -> dict[str, str]:
    return {"content-type": content_type, "authorization": f"Bearer {key}"}


@st.composite
def mutated(draw: st.DrawFn, good: dict[str, Any]) -> tuple[bytes, str]:
    body = copy.deepcopy(good)
    action = draw(st.sampled_from(["set", "set", "delete", "message", "messages"]))
    if action == "set":
        key = draw(st.sampled_from(PARAMS))
        body[key] = draw(json_values())
        label = f"{key}={body[key]!r}"
    elif action == "delete":
        key = draw(st.sampled_from(sorted(body)))
        del body[key]
        label = f"without {key}"
    elif action == "message" and "messages" in body:
        key = draw(st.sampled_from(MESSAGE_KEYS))
        body["messages"][0][key] = draw(json_values())
        label = f"messages[0].{key}={body['messages'][0][key]!r}"
    else:
        body["messages"] = draw(st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "", "USER", "bot"]),
             "content": st.one_of(st.text(max_size=20), json_values())}), max_size=5))
        label = f"messages={body['messages']!r}"
    return _dumps(body), label


@st.composite
def deep_nesting(draw: st.DrawFn, good: dict[str, Any]) -> tuple[bytes, str]:
    depth = draw(st.sampled_from([100, 1000, 5000, 20000, 100000]))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nested = opener * depth + "1" + closer * depth
    where = draw(st.sampled_from(["body", "content", "stop", *PARAMS[:6]]))
    if where == "body":
        return nested.encode(), f"{opener}*{depth}"
    body = _dumps({**good, where: "@@NEST@@"} if where != "content" else
                  {**good, "messages": [{"role": "user", "content": "@@NEST@@"}]})
    return body.replace(b'"@@NEST@@"', nested.encode()), f"{where}={opener}*{depth}"


@st.composite
def huge_string(draw: st.DrawFn, good: dict[str, Any]) -> tuple[bytes, str]:
    size = draw(st.integers(1_000, HUGE * 10))
    char = draw(st.sampled_from(["a", "é", "😀", " ", "\n", "{"]))
    body = copy.deepcopy(good)
    where = draw(st.sampled_from(["content", "model", "user", "stop", "role", "key"]))
    text = char * size
    if where == "content" and "messages" in body:
        body["messages"][0]["content"] = text
    elif where == "content":
        body["prompt"] = text
    elif where == "role" and "messages" in body:
        body["messages"][0]["role"] = text
    elif where == "key":
        body[text] = 1
    else:
        body[where] = text
    return _dumps(body), f"{where}={char!r}*{size}"


@st.composite
def invalid_utf8(draw: st.DrawFn, good: dict[str, Any]) -> tuple[bytes, str]:
    bad = draw(st.sampled_from(BAD_UTF8))
    target = draw(st.sampled_from(["model", "content", "anywhere"]))
    raw = _dumps(good)
    if target == "anywhere":
        cut = draw(st.integers(0, len(raw)))
        return raw[:cut] + bad + raw[cut:], f"{bad!r} at byte {cut}"
    needle = json.dumps(good.get("model", "")).encode() if target == "model" else b'"Hello"'
    if needle not in raw:
        needle = raw[:1]
    return raw.replace(needle, needle[:2] + bad + needle[2:], 1), f"{bad!r} in {target}"


@st.composite
def surrogate(draw: st.DrawFn, good: dict[str, Any]) -> tuple[bytes, str]:
    escape = draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud800x", "x\\udc00", "\\ud83d", "\\u0000"]))
    where = draw(st.sampled_from(["content", "model", "user", "stop", "role"]))
    body = copy.deepcopy(good)
    if where in ("content", "role") and "messages" in body:
        body["messages"][0][where] = "@@S@@"
    elif where == "content":
        body["prompt"] = "@@S@@"
    else:
        body[where] = "@@S@@"
    return _dumps(body).replace(b"@@S@@", escape.encode()), f"{where}=\"{escape}\""


def content_type() -> st.SearchStrategy[tuple[bytes | None, dict[str, str], str]]:
    types = st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             "application/json; charset=latin-1", "application/xml", "", "application/json"])
    bodies = st.one_of(st.none(), st.just(b""), st.sampled_from([b"null", b"[]", b"{}", b"\"x\"", b"1", b"a=b",
                                                                 b"{", b"}", b"\xef\xbb\xbf{}", b" " * 1000]),
                       st.binary(max_size=200))
    return st.builds(lambda t, b: (b, {"authorization": "Bearer k1", **({"content-type": t} if t else {})},
                                   f"content-type={t!r} body={b!r:.80}"), types, bodies)


def header_variants() -> st.SearchStrategy[tuple[dict[str, str], str]]:
    printable = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=300)
    auth = st.one_of(st.just(None), st.sampled_from(["Bearer k1", "Bearer k2", "Bearer", "Bearer ", "Basic k1",
                                                     "bearer k1", "Bearer nope", "Bearer k1 k2", "k1"]),
                     printable.map(lambda t: "Bearer " + t))
    extra = st.dictionaries(st.sampled_from(["x-request-id", "x-llmo-tenant", "x-llmo-application",
                                             "openai-organization", "content-length-x"]), printable, max_size=3)

    def build(a: str | None, e: dict[str, str]) -> tuple[dict[str, str], str]:
        headers = {"content-type": "application/json", **e}
        if a is not None:
            headers["authorization"] = a
        return headers, f"headers={headers!r:.300}"

    return st.builds(build, auth, extra)


def fill_path(path: str, draw: st.DrawFn, hints: tuple[str, ...]) -> str:
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        value = draw(st.one_of(st.sampled_from(list(hints) or ["x"]), st.text(max_size=40),
                               st.sampled_from(["..", "%2e%2e", "a/b", "x" * 5000, "\u202e"])))
        path = path[:start] + quote(value, safe="/") + path[end + 1:]
    return path


@st.composite
def http_inputs(draw: st.DrawFn, method: str, path: str, family: str, good: dict[str, Any] | None,
                hints: tuple[str, ...]) -> HttpInput:
    url = fill_path(path, draw, hints)
    if family == "query":
        query = draw(st.dictionaries(st.sampled_from(["limit", "after", "model", "page_token", "x", ""]),
                                     st.text(max_size=50), max_size=3))
        url += ("?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items())) if query else ""
        return HttpInput(url, None, _headers(), f"GET {url:.300}")
    if family == "headers":
        headers, label = draw(header_variants())
        return HttpInput(url, _dumps(good) if method == "POST" and good else None, headers, label)
    if family == "content_type":
        body, headers, label = draw(content_type())
        return HttpInput(url, body, headers, label)
    base = good or {}
    if family == "json_value":
        value = draw(json_values())
        return HttpInput(url, _dumps(value), _headers(), f"body={value!r:.300}")
    strategy = {"mutated": mutated, "deep_nesting": deep_nesting, "huge_string": huge_string,
                "invalid_utf8": invalid_utf8, "surrogate": surrogate}[family]
    body, label = draw(strategy(base))
    return HttpInput(url, body, _headers(), label)
