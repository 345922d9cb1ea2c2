"""radscan: nightly, unsupervised anomaly triage of chest radiographs.

Research and triage support only; not a diagnostic device.
"""

__version__ = "0.2.0"
