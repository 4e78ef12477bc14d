"""The judge as an HTTP server on Ray Serve (``tract-dist serve``): RAIL scores over ``/v1/judge``, an
OpenAI-compatible ``/v1/chat/completions`` and OpenRLHF's ``/get_reward``.

- ``schemas``: the request bodies and their limits (pydantic; every 4xx names its field)
- ``prompting``: chat prompts and RL queries -> judge inputs, judgements -> "[RESULT] n" text (pure Python)
- ``templates``: chat-template families, to split a policy's query in its own template (pure Python)
- ``replica``: the judge deployment (one ``Judge`` per replica, ``serve.batch``, stop signals)
- ``ingress``: the FastAPI ingress (auth, limits, fan-out, the deadline and its cancellation, work bound,
  retry on a dead replica)
- ``app``: building the application and running the server; ``commands``: the CLI

``replica``, ``ingress`` and ``app`` import Ray Serve and FastAPI; ``tract-dist``'s start-up imports only
``commands`` (and the pure-Python ``templates`` for its choices).
"""
