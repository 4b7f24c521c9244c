"""Recipes built on the library (`ouroboros_lm`), kept outside it as torchtune keeps its recipes
and configs apart from the library: sweeps over settings (`sweep.py`), their reports and plots
(`report.py`, `reference.py`), the `make demo` recipe and its config file (`demo.py`,
`demo.yaml`), the compression frontier over layer counts (`frontier.py`), and the corpus converters
`make domains` runs (`corpora.py`).

`ouroboros sweep|report|demo|frontier` reach these through the entry-point group `ouroboros_lm.commands`
(`commands.py`, registered in pyproject.toml); the library never imports from here.
"""
