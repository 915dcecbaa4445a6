"""Shared references of the rounding tests."""

from __future__ import annotations

import numpy as np
import pytest


def _paper_gpfq(w: np.ndarray, x_float: np.ndarray, x_quant: np.ndarray, alphabet: np.ndarray) -> np.ndarray:
    """One neuron, verbatim: u_t = u_{t-1} + w_t X_t - q_t X~_t, q_t = Q(<X~_t, u_{t-1} + w_t X_t> / ||X~_t||²)."""
    u = np.zeros(x_float.shape[0])
    q = np.zeros_like(w)
    for t in range(w.shape[0]):
        u = u + w[t] * x_float[:, t]
        norm = float(x_quant[:, t] @ x_quant[:, t])
        argument = float(x_quant[:, t] @ u) / norm if norm > 0 else w[t]
        q[t] = alphabet[np.argmin(np.abs(alphabet - argument))]
        u = u - q[t] * x_quant[:, t]
    return q


@pytest.fixture
def paper_gpfq():
    """The paper's GPFQ update for one neuron, literally (explicit residual ``u`` over the samples)."""
    return _paper_gpfq
