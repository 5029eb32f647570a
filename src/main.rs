fn main() {
    std::process::exit(streamfs::cli::main());
}
