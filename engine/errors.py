"""Typed engine errors. Each names the problem; the server maps each class to an HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises for bad input or state."""


class ModelLoadError(EngineError):
    """The base checkpoint cannot be loaded (unsupported architecture, missing tensor...)."""


class InvalidRequest(EngineError):
    """A request's parameters are invalid (bad sampling parameters, empty prompt...)."""


class NonFiniteOutput(InvalidRequest):
    """The model's logits for a request are NaN or Inf (its adapter overflows on its input)."""


class PromptTooLong(InvalidRequest):
    """The prompt plus requested tokens do not fit max_model_len."""


class EngineOverloaded(EngineError):
    """The engine cannot take more requests now."""


class EngineStopped(EngineError):
    """The engine loop is not running."""


class AdapterNotFound(EngineError):
    """No adapter of that name is registered, or its path does not exist."""


class AdapterAlreadyExists(EngineError):
    """An adapter of that name is already registered (load_inplace not set)."""


class AdapterLoadError(EngineError):
    """The adapter's files are invalid for this model or this engine (the message says why)."""


class AdapterPathForbidden(EngineError):
    """An adapter file resolves (links followed) outside the allowed directories."""


class AdapterFilesChanged(EngineError):
    """An adapter's files on disk are no longer those read when it was loaded."""
