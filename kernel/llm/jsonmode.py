"""JSON mode: a pushdown automaton over characters that says which continuations keep the
output a valid JSON prefix, and how to close it.

How the guarantee works: at every step the sampler only accepts a token whose text keeps the
output a valid prefix of a JSON object (`allows`); when the token budget left is no more than
what closing the value needs, the engine stops sampling and emits `closing()` instead. The
output is therefore always a complete JSON object that `json.loads` accepts. Whitespace runs are
capped so a model cannot stall inside the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_WS = " \t\n\r"
_MAX_WS_RUN = 4
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_HEX = set("0123456789abcdefABCDEF")

# Where the automaton is. "value" contexts expect a JSON value; "obj_*" and "arr_*" are the
# positions between the parts of a container.
VALUE, OBJ_OPEN, OBJ_KEY, OBJ_COLON, OBJ_NEXT, ARR_OPEN, ARR_NEXT, DONE = range(8)
# Lexemes in progress.
STRING, NUMBER, LITERAL = "string", "number", "literal"


@dataclass
class JsonState:
    """A valid prefix of a JSON object. `feed` returns False (and leaves the state unusable) on
    the first character that would make it invalid; `copy()` first to test a continuation."""

    pos: int = VALUE
    stack: list[str] = field(default_factory=list)  # "{" or "[" per open container
    lexeme: str | None = None
    string_is_key: bool = False
    escape: int = 0  # 0: none; -1: after backslash; n > 0: hex digits still expected
    number: str = ""  # the number's text so far
    literal: str = ""  # the literal's remaining characters
    ws_run: int = 0
    top_level_object: bool = True

    def copy(self) -> JsonState:
        return JsonState(self.pos, self.stack.copy(), self.lexeme, self.string_is_key,
                         self.escape, self.number, self.literal, self.ws_run,
                         self.top_level_object)

    @property
    def complete(self) -> bool:
        return self.pos == DONE and self.lexeme is None

    def feed(self, text: str) -> bool:
        return all(self._char(c) for c in text)

    def allows(self, text: str) -> bool:
        """Whether `text` keeps this a valid prefix (the state itself is not changed)."""
        return bool(text) and self.copy().feed(text)

    # --- the automaton -------------------------------------------------------------------

    def _char(self, c: str) -> bool:
        if self.lexeme == STRING:
            return self._string_char(c)
        if self.lexeme == LITERAL:
            if c != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self.lexeme = None
                self._value_done()
            return True
        if self.lexeme == NUMBER:
            if self._number_char(c):
                return True
            if not self._number_complete():
                return False
            self.lexeme = None
            self._value_done()
            # The character that ended the number is handled in the new position.
        if c in _WS:
            if self.pos == DONE or self.ws_run >= _MAX_WS_RUN:
                return False
            self.ws_run += 1
            return True
        self.ws_run = 0
        return self._structural(c)

    def _structural(self, c: str) -> bool:
        pos = self.pos
        if pos in (VALUE, ARR_OPEN):
            if pos == ARR_OPEN and c == "]":
                return self._close("[")
            return self._start_value(c)
        if pos in (OBJ_OPEN, OBJ_KEY):
            if c == '"':
                self.lexeme, self.string_is_key = STRING, True
                return True
            return pos == OBJ_OPEN and c == "}" and self._close("{")
        if pos == OBJ_COLON:
            if c == ":":
                self.pos = VALUE
                return True
            return False
        if pos == OBJ_NEXT:
            if c == ",":
                self.pos = OBJ_KEY
                return True
            return c == "}" and self._close("{")
        if pos == ARR_NEXT:
            if c == ",":
                self.pos = VALUE
                return True
            return c == "]" and self._close("[")
        return False  # DONE: nothing may follow

    def _start_value(self, c: str) -> bool:
        if not self.stack and self.top_level_object and c != "{":
            return False
        if c == "{":
            self.stack.append("{")
            self.pos = OBJ_OPEN
        elif c == "[":
            self.stack.append("[")
            self.pos = ARR_OPEN
        elif c == '"':
            self.lexeme, self.string_is_key = STRING, False
        elif c == "-" or (c.isdigit() and c.isascii()):
            self.lexeme, self.number = NUMBER, c
        elif c in _LITERALS:
            self.lexeme, self.literal = LITERAL, _LITERALS[c][1:]
        else:
            return False
        return True

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        self._value_done()
        return True

    def _value_done(self) -> None:
        if not self.stack:
            self.pos = DONE
        else:
            self.pos = OBJ_NEXT if self.stack[-1] == "{" else ARR_NEXT

    def _string_char(self, c: str) -> bool:
        if self.escape == -1:
            if c == "u":
                self.escape = 4
            elif c in '"\\/bfnrt':
                self.escape = 0
            else:
                return False
            return True
        if self.escape > 0:
            if c not in _HEX:
                return False
            self.escape -= 1
            return True
        if c == "\\":
            self.escape = -1
        elif c == '"':
            self.lexeme = None
            if self.string_is_key:
                self.pos = OBJ_COLON
            else:
                self._value_done()
        elif ord(c) < 0x20:
            return False  # control characters must be escaped
        return True

    def _number_char(self, c: str) -> bool:
        n = self.number
        if c.isdigit() and c.isascii():
            # No leading zeros: "0" may only be followed by ".", "e" or the end.
            return n not in ("0", "-0") and self._append(c)
        if c == "." and "." not in n and "e" not in n.lower() and n[-1].isdigit():
            return self._append(c)
        if c in "eE" and "e" not in n.lower() and n[-1].isdigit():
            return self._append(c)
        if c in "+-" and n[-1] in "eE":
            return self._append(c)
        return False

    def _append(self, c: str) -> bool:
        self.number += c
        return True

    def _number_complete(self) -> bool:
        return self.number[-1].isdigit()

    # --- closing -------------------------------------------------------------------------

    def closing(self) -> str:
        """The shortest text that turns this prefix into a complete JSON value."""
        out = []
        pos = self.pos
        if self.lexeme == STRING:
            if self.escape == -1:
                out.append("n")
            elif self.escape > 0:
                out.append("0" * self.escape)
            out.append('"')
            pos = OBJ_COLON if self.string_is_key else None
        elif self.lexeme == NUMBER:
            if not self._number_complete():
                out.append("0")
            pos = None
        elif self.lexeme == LITERAL:
            out.append(self.literal)
            pos = None
        if pos is None:
            pos = DONE if not self.stack else (OBJ_NEXT if self.stack[-1] == "{" else ARR_NEXT)
        if pos == VALUE:
            out.append("{}" if not self.stack and self.top_level_object else "null")
        elif pos == OBJ_KEY:
            out.append('"":null')
        elif pos == OBJ_COLON:
            out.append(":null")
        out.extend("}" if opener == "{" else "]" for opener in reversed(self.stack))
        return "".join(out)
