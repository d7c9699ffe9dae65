"""Type stubs for fastvec._sync (cross-process doorbells)."""

from types import TracebackType
from typing import Final, Literal, final

from typing_extensions import Buffer, Self  # stub-only; never executed

HAVE_FUTEX: Final[bool]

@final
class Doorbells:
    """Atomic 32-bit doorbell words over a writable, C-contiguous buffer."""

    # Cython's __cinit__ takes the argument, so it is __new__ that has the signature
    def __new__(cls, buffer: Buffer) -> Self: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def released(self) -> bool: ...
    def load(self, offset: int) -> int: ...
    def store(self, offset: int, value: int) -> None: ...
    def add(self, offset: int, delta: int) -> int: ...
    def wake(self, offset: int, count: int = ...) -> int: ...
    def wait_while_equal(
        self,
        offset: int,
        expected: int,
        timeout: float = -1.0,
        spin: float = 20e-6,
        yield_cpu: bool = False,
    ) -> Literal[0, 1]: ...
    def release(self) -> None: ...
    def __enter__(self) -> Doorbells: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]: ...

def kill_group_on_parent_death(signum: int) -> None: ...
