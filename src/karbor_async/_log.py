"""The library's loggers: structlog over the standard ``logging`` tree under ``karbor_async``.

Every logger of the engine, ``ctx.log`` and the reference plugins comes from
:func:`get_logger`. It wraps ``logging.getLogger("karbor_async.<name>")`` in a
structlog bound logger built here, with this module's own processors, so:

- the library is silent until the application configures ``logging``: the
  ``karbor_async`` logger has a ``NullHandler`` and no level of its own
  (``logging.basicConfig(level=logging.INFO)`` turns the logs on);
- whatever the application passed to ``structlog.configure`` changes nothing here
  (neither where our lines go nor whether they print): nothing is read from
  structlog's global configuration;
- a call below the stdlib logger's level returns after one ``isEnabledFor``
  (the event dict is never built), so hot paths may log at debug.

A line reaches ``logging`` as a record whose ``msg`` is the event dict: a
structlog ``ProcessorFormatter`` on a handler renders it (console or JSON, with
every field); any other formatter prints ``event key=value ...``. Resources
are written ``TYPE#ID`` (:func:`ref`), as in plans, events and errors.

Names: the engine's modules log under ``karbor_async.<module>``, a run's lines
(from whichever room) under ``karbor_async.run``, ``ctx.log`` under
``karbor_async.plugins``, and a plugin module's ``get_logger(__name__)`` under
``karbor_async.plugins.<its module>``, so one switch on ``karbor_async`` covers
every line a run produces, plugins included.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Self, TextIO

import structlog

from karbor_async._types import Resource, ResourceKey

__all__ = [
    "PLUGINS",
    "ROOT",
    "RUN",
    "Logger",
    "configure",
    "formatter",
    "get_logger",
    "ref",
]

ROOT = "karbor_async"
"""The library's logger; its only handler is a ``NullHandler``."""

RUN = f"{ROOT}.run"
"""A run's lines, bound to its id and operation, whichever room logs them."""

PLUGINS = f"{ROOT}.plugins"
"""Where ``ctx.log`` and plugin modules' loggers live."""

logging.getLogger(ROOT).addHandler(logging.NullHandler())

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


class Logger(structlog.stdlib.BoundLogger):
    """A structlog stdlib logger that asks ``isEnabledFor`` before building anything.

    structlog's own ``filter_by_level`` processor drops a filtered call only
    after the event dict was copied and merged; here a call below the stdlib
    logger's level costs one method call and the stdlib's cached level check.
    """

    def bind(self, **new_values: Any) -> Self:
        # ctx.log binds on every access: straight to the constructor, no super() chain.
        return type(self)(self._logger, self._processors, {**self._context, **new_values})

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._logger.isEnabledFor(logging.DEBUG):
            return self._proxy_to_logger("debug", event, *args, **kw)
        return None

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._logger.isEnabledFor(logging.INFO):
            return self._proxy_to_logger("info", event, *args, **kw)
        return None

    def _proxy_to_logger(
        self,
        method_name: str,
        event: str | None = None,
        *event_args: str,
        **event_kw: Any,
    ) -> Any:
        if not self._logger.isEnabledFor(_LEVELS.get(method_name, logging.NOTSET)):
            return None
        return super()._proxy_to_logger(method_name, event, *event_args, **event_kw)


class _Message(dict[str, Any]):
    """The event dict as a record's ``msg``: ``ProcessorFormatter`` copies it as a dict;
    a plain ``logging.Formatter`` prints ``str()`` of it, ``event key=value ...``."""

    def __str__(self) -> str:
        parts = [str(self.get("event", ""))]
        for key, value in self.items():
            if key == "event" or key == "exc_info" or key.startswith("_"):
                continue
            text = value if isinstance(value, str) else repr(value)
            if not text or any(c in text for c in ' "=\n'):
                text = repr(text)
            parts.append(f"{key}={text}")
        return " ".join(parts)


def _hand_over(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The last processor: the stdlib call's arguments (as ``wrap_for_formatter`` makes
    them, with the traceback of ``exc_info`` passed on so plain formatters print it)."""
    exc_info = event_dict.get("exc_info")
    kwargs: dict[str, Any] = {"extra": {"_logger": logger, "_name": method_name}}
    if exc_info:
        if exc_info is True:
            exc_info = sys.exc_info()
        elif isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        event_dict["exc_info"] = exc_info
        kwargs["exc_info"] = exc_info
    return (_Message(event_dict),), kwargs


_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.PositionalArgumentsFormatter(),
    _hand_over,
]
"""What runs between a call that passed the level check and ``logging``: the
application's ``structlog.contextvars`` (a request id bound around our calls)
join the line, ``log.info("copied %d", n)`` is formatted; rendering is the
handler's formatter's business."""


def get_logger(name: str, **context: Any) -> Logger:
    """The structlog logger over ``logging.getLogger(...)`` for ``name``.

    ``name`` is a module's ``__name__``: under ``karbor_async`` it is used as it
    is; any other (a plugin's module) is put under ``karbor_async.plugins``.
    ``context`` is bound to every line. Built directly, as ``structlog.wrap_logger``
    would with every argument given but without its lazy proxy, so structlog's
    global configuration plays no part.
    """
    if name != ROOT and not name.startswith(ROOT + "."):
        name = f"{PLUGINS}.{name}"
    return Logger(logging.getLogger(name), processors=_PROCESSORS, context=dict(context))


def ref(resource: Resource | ResourceKey) -> str:
    """A resource as log lines write it: ``TYPE#ID``."""
    if isinstance(resource, Resource):
        return f"{resource.type}#{resource.id}"
    return f"{resource[0]}#{resource[1]}"


def formatter(*, json: bool = False, colors: bool = False) -> logging.Formatter:
    """A ``ProcessorFormatter`` rendering our records (and any other) as console lines
    or JSON objects, with time stamp, level and logger name; tracebacks never show
    local variables."""
    tail: list[Any]
    if json:
        # Never a traceback's local variables: they may hold resolved secrets.
        tracebacks = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        tail = [
            structlog.processors.ExceptionRenderer(tracebacks),
            structlog.processors.JSONRenderer(),
        ]
    else:
        plain = structlog.dev.plain_traceback  # (rich's default shows the locals)
        tail = [structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=plain)]
    return structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso"),
            *tail,
        ]
    )


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at each line (as ``logging.lastResort`` does),
    so a redirected or captured stderr gets the lines, not a stream closed since."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        logging.Handler.__init__(self, level)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure(level: int, *, json: bool = False) -> logging.Handler:
    """Send ``karbor_async`` lines at ``level`` and above to stderr (the CLI's options).

    An application's own configuration, done once in its entry point: one handler
    on the ``karbor_async`` logger with :func:`formatter`. Calling it again replaces
    the handler it added before.
    """
    log = logging.getLogger(ROOT)
    for old in [h for h in log.handlers if isinstance(h, _StderrHandler)]:
        log.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(formatter(json=json, colors=not json and sys.stderr.isatty()))
    log.addHandler(handler)
    log.setLevel(level)
    return handler
