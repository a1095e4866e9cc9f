"""Where units run: ``local`` (this process, or a pool of worker processes on this machine) or
``ray`` (Ray Data tasks on a local Ray instance or an existing cluster).

Both take the same (job, unit) pairs and hand each unit's result back to the driver as it
completes, so the driver alone writes the journal. At most a few units are in flight per
worker, so memory does not grow with the number of images.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterable

from protect.runner.formats import Unit
from protect.runner.unit import JobSpec, process_unit

ENGINES = ("local", "ray")
OnResult = Callable[[dict[str, Any]], None]


class EngineError(RuntimeError):
    """The engine could not be started (Ray missing or unreachable); the message says how to fix it."""


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run_units(
    engine: str, job: JobSpec, units: Iterable[Unit], on_result: OnResult, *, workers: int, address: str | None = None
) -> None:
    """Protect every unit on ``engine`` with ``workers`` parallel workers, calling ``on_result``
    in the driver for each finished unit (in completion order)."""
    if engine == "local":
        _run_local(job, units, on_result, workers)
    elif engine == "ray":
        _run_ray(job, list(units), on_result, workers, address)
    else:
        raise EngineError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


def _run_local(job: JobSpec, units: Iterable[Unit], on_result: OnResult, workers: int) -> None:
    if workers <= 1:
        for unit in units:
            on_result(process_unit(job, unit))
        return
    # spawn, not fork: forking a process that has started torch's thread pools can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        in_flight: set[Future] = set()
        for unit in units:
            if len(in_flight) >= 2 * workers:
                in_flight = _collect(in_flight, on_result)
            in_flight.add(pool.submit(process_unit, job, unit))
        while in_flight:
            in_flight = _collect(in_flight, on_result)


def _collect(in_flight: set[Future], on_result: OnResult) -> set[Future]:
    done, rest = wait(in_flight, return_when=FIRST_COMPLETED)
    for future in done:
        on_result(future.result())
    return rest


def _ray_process(row: dict[str, Any]) -> dict[str, Any]:
    job, unit = pickle.loads(row["task"])
    return {"result": pickle.dumps(process_unit(job, unit))}


def _run_ray(job: JobSpec, units: list[Unit], on_result: OnResult, workers: int, address: str | None) -> None:
    try:
        import ray
        import ray.data
    except ImportError:
        raise EngineError("--engine ray needs Ray Data: pip install 'protect[batch]'") from None
    if not units:
        return
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EngineError(f"could not start or reach Ray{' at ' + address if address else ''}: {exc}") from None
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        # One block per unit, so units spread over the workers; the driver gets each result as it ends.
        tasks = ray.data.from_items([{"task": pickle.dumps((job, unit))} for unit in units], override_num_blocks=len(units))
        for row in tasks.map(_ray_process, num_cpus=1, concurrency=workers).iter_rows():
            on_result(pickle.loads(row["result"]))
    finally:
        if started_here:
            ray.shutdown()
