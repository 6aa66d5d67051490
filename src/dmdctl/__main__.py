from dmdctl.cli import main

main()
