"""The benchmark: ``python -m bench`` (``make bench``). See docs/performance.md.

Measures the decision path in-process and the whole Envoy path with real Envoy, wrk and our
servers on 127.0.0.1; prints a report and saves JSON under bench/results/. Asserts nothing about
time. Dev tool: may import anything (the dev IdP included); production code never imports it.
"""
