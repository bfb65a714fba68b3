"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a UserError into a single line on stderr and exit status 2; everything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message names the problem, `fix` says how."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        text = self.problem.rstrip(".")
        if self.fix:
            text += f". Fix: {self.fix.rstrip('.')}"
        # One line, whatever the parts contained.
        return " ".join(text.split()) + "."
