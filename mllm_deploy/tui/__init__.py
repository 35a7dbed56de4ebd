"""`mllm-deploy up`: the Textual terminal UI.

The only package that imports textual. Modules that do not (deployment, reconfigure,
commands, sessions, formatting) hold the logic and are tested without a terminal; `app`,
`widgets/` and `screens/` are the Textual front end. Importing this package itself imports
no textual.
"""
