"""Experiment tooling built on the core package: sweeps over settings, reports with plots, the
embedded `make demo` recipe. The core never imports from here."""
