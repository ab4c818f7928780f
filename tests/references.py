"""Independent NumPy computations that several test modules compare the library with."""

import numpy as np


def numpy_krr(feat_target, feat_support, y_support, reg):
  """FRePo Eq. 2 in float64: `K_ts (K_ss + reg * tr(K_ss) / n_s I)^-1 Y_s`, `(n_t, C)`."""
  feat_target, feat_support, y_support = (np.asarray(a, np.float64)
                                          for a in (feat_target, feat_support, y_support))
  k_ss = feat_support @ feat_support.T
  ridge = reg * np.trace(k_ss) / len(feat_support)
  alpha = np.linalg.solve(k_ss + ridge * np.eye(len(feat_support)), y_support)
  return feat_target @ feat_support.T @ alpha
