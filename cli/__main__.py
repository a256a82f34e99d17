from fcrun_cli.main import main

main(prog_name="fcrun")
