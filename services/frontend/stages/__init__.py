"""The pipeline's stages, one module each; ``services/frontend/pipeline.py`` chains them.

Request stages, in the order a request meets them: ``prompt`` (tokenize + prompt check),
``response_cache``, ``budget``. Then ``generate`` (the worker's stream), and the output
stages in the order its output meets them: ``detokenize``, ``stops``, ``moderation``.
Every stage has the interface of ``call.Stage``.
"""
