from radscan.cli import main

main()
