"""What every stand-in server of the benchmark does once it listens: say "ready", serve until
SIGTERM, then close (the floors; the backend serves until killed)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


async def until_sigterm(close: Callable[[], Awaitable[object]]) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await close()
