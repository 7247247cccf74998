"""How often the 135M model's *constrained* output is also sensible.

Forced tool calls and ``json_schema`` replies on the llama engine are always valid JSON
for their schema (a llama.cpp grammar allows nothing else); whether the values make
sense is up to the model. This benchmark asks for the city of a weather question, over
a fixed set of cities and phrasings, through the official SDKs against a llama-engine
local API, at temperature 0:

- **tool**: Anthropic ``messages.create`` with ``tool_choice={"type": "tool", ...}``
  for ``get_weather(city)``; the answer is the tool_use block's ``input["city"]``;
- **any**: two tools (``get_weather``, ``get_time``) and ``tool_choice={"type":
  "any"}``; every other question asks for the time instead ("What time is it in
  Paris?"), so the model must also pick the right tool;
- **json**: OpenAI ``chat.completions.parse`` with ``response_format=City``.

An answer is *right* when it names the asked city (case-insensitive, surrounding
punctuation ignored), *valid* when it parses against the schema. Printed: one row per
question, then right/valid counts and latency per mode.

Usage: ``python benchmarks/constrained.py [--quick]`` (``--quick``: 4 questions).
"""

from __future__ import annotations

import argparse
import statistics
import time

CITIES = [
    "Mumbai",
    "Paris",
    "Oslo",
    "Nairobi",
    "Tokyo",
    "Lima",
    "Cairo",
    "Toronto",
    "Sydney",
    "Berlin",
]
PHRASINGS = [
    "What's the weather in {}?",
    "Is it raining in {} right now?",
    "Tell me the temperature in {} today.",
    "I'm flying to {} tomorrow. How's the weather there?",
]
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "input_schema": CITY_SCHEMA,
}
TIME_QUESTION = "What time is it in {} now?"
TIME = {
    "name": "get_time",
    "description": "Get the local time in a city.",
    "input_schema": CITY_SCHEMA,
}


def questions(quick: bool) -> list[tuple[str, str]]:
    out = [(c, PHRASINGS[i % len(PHRASINGS)].format(c)) for i, c in enumerate(CITIES)]
    return out[:4] if quick else out


def right(answer: str | None, city: str) -> bool:
    return answer is not None and answer.strip(" .,!?\"'").lower() == city.lower()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 questions instead of 10")
    args = ap.parse_args()

    import anthropic
    import openai
    from pydantic import BaseModel

    from labkit.localapi import MODEL_ID, LocalAPIServer

    class City(BaseModel):
        city: str

    rows = []
    times: dict[str, list[float]] = {"tool": [], "any": [], "json": []}
    with LocalAPIServer("llama") as api:
        claude = anthropic.Anthropic(base_url=api.base_url, api_key="local", max_retries=0)
        gpt = openai.OpenAI(base_url=api.openai_base_url, api_key="local", max_retries=0)
        for city, question in questions(args.quick):
            row: dict[str, object] = {"city": city, "question": question}
            msgs = [{"role": "user", "content": question}]
            for mode in ("tool", "any"):
                wanted = "get_weather"
                if mode == "any" and len(rows) % 2:
                    wanted = "get_time"
                    msgs = [{"role": "user", "content": TIME_QUESTION.format(city)}]
                t0 = time.perf_counter()
                msg = claude.messages.create(
                    model=MODEL_ID,
                    max_tokens=40,
                    messages=msgs,
                    tools=[WEATHER] if mode == "tool" else [WEATHER, TIME],
                    tool_choice={"type": "tool", "name": "get_weather"}
                    if mode == "tool"
                    else {"type": "any"},
                    extra_body={"temperature": 0},
                )
                times[mode].append(time.perf_counter() - t0)
                block = next((b for b in msg.content if b.type == "tool_use"), None)
                answer = block.input.get("city") if block is not None else None
                row[mode] = answer if mode == "tool" else f"{block.name if block else '-'}:{answer}"
                row[mode + "_ok"] = right(answer, city) and (
                    mode == "tool" or (block is not None and block.name == wanted)
                )
                row[mode + "_valid"] = isinstance(answer, str)
            msgs = [{"role": "user", "content": question}]
            t0 = time.perf_counter()
            done = gpt.chat.completions.parse(
                model=MODEL_ID, messages=msgs, response_format=City, temperature=0, max_tokens=40
            )
            times["json"].append(time.perf_counter() - t0)
            parsed = done.choices[0].message.parsed
            row["json"] = parsed.city if parsed else None
            row["json_ok"] = right(row["json"], city)  # type: ignore[arg-type]
            row["json_valid"] = parsed is not None
            rows.append(row)
            print(
                f"{city:<8} tool={row['tool']!s:<12} any={row['any']!s:<22} json={row['json']!s:<12}",
                flush=True,
            )

    n = len(rows)
    print()
    print(f"{'mode':<6} {'sensible':>9} {'valid':>7} {'p50 s':>7} {'max s':>7}")
    for mode in ("tool", "any", "json"):
        ok = sum(bool(r[mode + "_ok"]) for r in rows)
        valid = sum(bool(r[mode + "_valid"]) for r in rows)
        ts = times[mode]
        print(
            f"{mode:<6} {ok:>5}/{n:<3} {valid:>3}/{n:<3} {statistics.median(ts):>7.2f} {max(ts):>7.2f}"
        )


if __name__ == "__main__":
    main()
