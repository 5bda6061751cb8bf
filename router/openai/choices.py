"""The choices of one OpenAI request (`n` per prompt, several prompts) run as concurrent
generations: copied per choice (`per_choice`), merged into one event stream as their tokens come
(`merge_streams`), or collected whole (`collect`). Leaving the merged stream (client gone, an error
in one choice) cancels every one of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

from router.errors import IncompleteGenerationError
from router.events import ErrorEvent
from router.openai.responses import Choice
from router.validation import ValidRequest


def per_choice(valid: ValidRequest, n: int) -> list[ValidRequest]:
    """`n` copies of a request; with a seed, choice i samples with seed + i."""
    seed = valid.parameters.seed
    if n == 1 or seed is None:
        return [valid] * n
    return [replace(valid, parameters=replace(valid.parameters, seed=(seed + i) % 2**64)) for i in range(n)]


async def merge_streams(infer, valids: list[ValidRequest]) -> AsyncIterator[tuple[int, object]]:
    """(choice index, event) of several generations as they come. Closing this iterator (or an
    error ending it) cancels every generation still running."""
    if len(valids) == 1:
        async with aclosing(infer.stream(valids[0])) as events:
            async for event in events:
                yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()
    # Choices with the same prompt share its KV: the first one of each prompt starts at once, the
    # others once it has its first token, when its prompt blocks are in the prefix cache.
    prefilled: dict[tuple[int, ...], asyncio.Event] = {}
    leaders = set()
    for index, valid in enumerate(valids):
        if valid.input_ids not in prefilled:
            prefilled[valid.input_ids] = asyncio.Event()
            leaders.add(index)

    async def pump(index: int, valid: ValidRequest) -> None:
        ready = prefilled[valid.input_ids]
        try:
            if index not in leaders:
                await ready.wait()
            async with aclosing(infer.stream(valid)) as events:
                async for event in events:
                    ready.set()
                    queue.put_nowait((index, event))
        except Exception as error:  # noqa: BLE001 - becomes this choice's error event
            failure = IncompleteGenerationError(f"Incomplete generation: {error}")
            queue.put_nowait((index, ErrorEvent(failure)))
        finally:
            ready.set()  # a failed leader must not leave its followers waiting
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, v)) for i, v in enumerate(valids)]
    try:
        live = len(tasks)
        while live:
            index, event = await queue.get()
            if event is None:
                live -= 1
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(infer, valids: list[ValidRequest], prompt_indexes: list[int]) -> list[Choice]:
    choices = [Choice(i, prompt_indexes[i]) for i in range(len(valids))]
    async with aclosing(merge_streams(infer, valids)) as events:
        async for index, event in events:
            if isinstance(event, ErrorEvent):
                raise event.error
            choices[index].events.append(event)
            if event.finish is not None:
                choices[index].finish = event.finish
    if any(c.finish is None for c in choices):
        raise IncompleteGenerationError()
    return choices
