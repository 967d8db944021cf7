"""Online serving on Ray Serve (DESIGN §2): ingress + retrieval stage + generation stage.

``app`` builds / runs / hot-reloads the application; ``stages`` and ``ingress`` hold the
replica classes; ``control`` the version protocol that keeps both stages on one
checkpoint; ``api`` the OpenAI request/response shapes; ``versions`` what a stage loads.
"""
