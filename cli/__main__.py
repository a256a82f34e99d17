from fcrun_cli.fast import main

main()
