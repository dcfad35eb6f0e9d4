"""Stand-ins for the services the plugin talks to, for tests, benchmarks and trying the commands offline.
Nothing in the rest of the package imports this one.

local_server.py  an OpenAI-compatible HTTP server on 127.0.0.1 (chat completions and the Batch API) that
                 can be told to fail the ways real servers do
"""
