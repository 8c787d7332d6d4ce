"""hen_fast: fused Modern Hopfield Network retrieval over very large memory banks.

The public API. Importing it needs no GPU and no compiled extension.
"""

from . import oracle
from .api import retrieve
from .backends import (
    Backend,
    BackendUnavailableError,
    Request,
    available_backends,
    register_backend,
    registered_backends,
    unregister_backend,
)
from .bank import BankIntegrityError, MemoryBank
from .codes import SEPARATIONS, SIMILARITIES
from .hen import HeteroAssociativeNetwork, HopfieldEncodingNetwork
from .index import BankIndex
from .info import RetrieveInfo

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "BankIndex",
    "BankIntegrityError",
    "HeteroAssociativeNetwork",
    "HopfieldEncodingNetwork",
    "MemoryBank",
    "Request",
    "RetrieveInfo",
    "SEPARATIONS",
    "SIMILARITIES",
    "available_backends",
    "oracle",
    "register_backend",
    "registered_backends",
    "retrieve",
    "unregister_backend",
    "__version__",
]
