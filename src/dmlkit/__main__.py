from dmlkit.cli import console_main

console_main()
