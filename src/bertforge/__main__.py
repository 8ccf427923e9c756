from bertforge.cli import main_entry

main_entry()
