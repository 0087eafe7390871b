"""Reflexion: answer, have the answer judged, and after a failure write down a lesson and try
again with every lesson learnt so far.

    agentos run --cap llm.chat userland/agents/reflexion.py -- --expect 391 "What is 17 * 23?"

Options before the task: `--model NAME` (default: the kernel's default), `--tries N`
(default 3), `--max-tokens N` (per model call, default 64), and the judge: `--expect TEXT`
(passes when the answer contains TEXT), `--check CODE` (Python run in the kernel's `python`
tool with `answer` bound to the answer; passes when it exits 0: needs
`--cap tools.call@tool/python`), or neither: the model critiques its own answer.

Every attempt is kept in the agent's own memory, tagged with the task, so a later run of the
same task (under the same agent name) starts from the lessons of the earlier ones.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from typing import Any

from sdk import Agent, SyscallError

LESSONS_SHOWN = 5  # the newest lessons go into the prompt; all of them stay in memory
LESSON_CHARS = 300  # a rambling lesson is cut: it is repeated in every later prompt


def options(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reflexion.py")
    parser.add_argument("--model", help="model to use (default: the kernel's default)")
    parser.add_argument("--tries", type=int, default=3, help="attempts in this run")
    parser.add_argument("--max-tokens", type=int, default=64, help="per model call")
    judge = parser.add_mutually_exclusive_group()
    judge.add_argument("--expect", help="the answer must contain this text")
    judge.add_argument("--check", help="Python that must exit 0 with `answer` bound")
    parser.add_argument("task", nargs="+")
    return parser.parse_args(argv)


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s.-]", " ", text.casefold()).split())


class Reflexion(Agent):
    def run(self, task: str) -> dict[str, Any]:
        opts = options(sys.argv[1:])
        return self.solve(" ".join(opts.task), opts)

    def solve(self, task: str, opts: argparse.Namespace) -> dict[str, Any]:
        """The attempts themselves, for `opts` as `options` parses them (tools/bench/quality.py
        runs it in-process too, its model calls made directly)."""
        self.opts = opts
        # Attempts are filed under the task's text (case and punctuation aside).
        key = hashlib.sha256(_plain(task).encode()).hexdigest()[:16]
        past = self.past_attempts(key)
        lessons = [m.metadata["lesson"] for m in past if m.metadata.get("lesson")]
        print(f"{len(past)} earlier attempts at this task, {len(lessons)} lessons", flush=True)
        attempts = []
        for n in range(1, opts.tries + 1):
            answer = self.answer(task, lessons[-LESSONS_SHOWN:])
            passed, feedback = self.judge(task, answer)
            lesson = "" if passed else self.reflect(task, answer, feedback)
            attempt = {"answer": answer, "passed": passed, "feedback": feedback, "lesson": lesson}
            attempts.append(attempt)
            # Durable before the next try: a crash or a rerun keeps what was learnt.
            self.memory.add(f"Task: {task}\nAnswer: {answer}\nJudged: {feedback}\n"
                            f"Lesson: {lesson or '-'}",
                            {"kind": "reflexion", "task": key, "run_attempt": n, **attempt})
            print(f"attempt {n}: {'passed' if passed else 'failed'}: {answer!r}", flush=True)
            if passed:
                break
            lessons.append(lesson)
        return {"task": task, "answer": attempts[-1]["answer"], "passed": attempts[-1]["passed"],
                "judge": ("expect" if opts.expect is not None else
                          "python" if opts.check is not None else "model"),
                "remembered": len(past), "attempts": attempts}

    def past_attempts(self, key: str) -> list[Any]:
        found, after = [], 0
        while page := self.memory.list(after=after, limit=100,
                                       filter={"kind": "reflexion", "task": key}):
            found += page
            after = page[-1].id
        return found

    def chat(self, prompt: str, system: str | None = None) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        reply = self.llm.chat([*messages, {"role": "user", "content": prompt}],
                              model=self.opts.model, max_tokens=self.opts.max_tokens)
        return (reply.message.content or "").strip()

    def answer(self, task: str, lessons: list[str]) -> str:
        prompt = f"Answer briefly.\nTask: {task}"
        if lessons:
            prompt += "\nMistakes in your earlier answers to it:\n" + "\n".join(
                f"- {lesson}" for lesson in lessons)
        return self.chat(prompt)

    def judge(self, task: str, answer: str) -> tuple[bool, str]:
        """(passed, feedback). The feedback never gives the expected answer away."""
        if self.opts.expect is not None:
            # As whole words: an expected 391 is not in 3910.
            ok = re.search(rf"(?<!\w){re.escape(_plain(self.opts.expect))}(?!\w)",
                           _plain(answer)) is not None
            return ok, "correct" if ok else "wrong: that is not the expected answer"
        if self.opts.check is not None:
            code = f"answer = {answer!r}\n{self.opts.check}\n"
            try:
                result = self.tools.call("python", code=code)
            except SyscallError as exc:  # no right to run it, or the tool is not there
                return False, f"the check could not run: {exc}"
            value = result.value or {}
            if result.error or value.get("exit") != 0:
                output = (result.error or value.get("output", "")).strip().splitlines()
                return False, "the check failed: " + (output[-1] if output else "no output")
            return True, "the check passed"
        verdict = self.chat(f"Task: {task}\nAnswer: {answer}\nIs the answer correct? Reply "
                            "CORRECT or WRONG, then say why in one sentence.")
        return verdict.upper().startswith("CORRECT"), verdict or "(no critique)"

    def reflect(self, task: str, answer: str, feedback: str) -> str:
        # Asked as a reviewer of someone's answer, a small model names a mistake; asked what
        # it will do differently, it tends to apologise or to repeat the answer.
        lesson = self.chat(f"Task: {task}\nAnswer: {answer}\nThis answer was judged: {feedback}"
                           "\nIn one sentence, what is the mistake?",
                           system="You find mistakes in answers.")
        return lesson[:LESSON_CHARS] or "(no lesson)"
