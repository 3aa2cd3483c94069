from npuconv.cli import main

main()
