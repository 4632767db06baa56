//! `ish-reaper`: the reaper each command of a slave runs under (see `ish_slave::reaper`). The
//! `ish` binary can play this part itself, but every command pays for starting the reaper: this
//! one is small, so it starts in a fraction of the time. A slave uses it when it is installed
//! next to `ish`.
fn main() {
    ish_slave::reaper::main_if_reaper();
    eprintln!(
        "ish-reaper is started by `ish slave` for each command it runs, not by hand: {} <grace ms> <program> [args]",
        ish_slave::reaper::ARG
    );
    std::process::exit(2);
}
