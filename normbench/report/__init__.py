"""`normbench report`: finished run folders read back (`runs`), grouped into a grid of
settings (`grid`), compared with Welch tests (`significance`, `differences`), summarized in
words (`findings`) and drawn (`plots`); `command` is the CLI entry.
"""
