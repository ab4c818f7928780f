"""Independent NumPy computations that several test modules compare the library with."""

import numpy as np
from scipy.spatial.distance import cdist


def numpy_krr(feat_target, feat_support, y_support, reg):
  """FRePo Eq. 2 in float64: `K_ts (K_ss + reg * tr(K_ss) / n_s I)^-1 Y_s`, `(n_t, C)`."""
  feat_target, feat_support, y_support = (np.asarray(a, np.float64)
                                          for a in (feat_target, feat_support, y_support))
  k_ss = feat_support @ feat_support.T
  ridge = reg * np.trace(k_ss) / len(feat_support)
  alpha = np.linalg.solve(k_ss + ridge * np.eye(len(feat_support)), y_support)
  return feat_target @ feat_support.T @ alpha


def numpy_mmd2(x, y, bandwidths=(1.0, 2.0, 4.0, 8.0, 16.0), unbiased=True):
  """D3 Eq. 4 in float64: the RBF-mixture MMD^2 (U-statistic, or V-statistic when biased)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  kernel = lambda a, b: sum(np.exp(-cdist(a, b, "sqeuclidean") / (2 * s ** 2))
                            for s in bandwidths)
  k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
  n, m = len(x), len(y)
  if unbiased:
    return ((k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
            + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1)) - 2 * k_xy.mean())
  return k_xx.mean() + k_yy.mean() - 2 * k_xy.mean()
