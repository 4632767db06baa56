//! What a master keeps per build: database bytes per build and per atom, result files per build.
use std::path::Path;

/// What a master keeps on disk: its database, and its builds' results — the atoms' own files
/// (the one copy of each console and artifact), the archive index with failures.txt and the
/// archive sizes, and stored archives (none: they are written again for each download, so
/// their sizes are reported apart, as measured by the master).
pub(super) struct Footprint {
    pub(super) db: u64,
    pub(super) plain: u64,
    pub(super) index: u64,
    pub(super) stored_archives: u64,
    pub(super) zip: u64,
    pub(super) tar_gz: u64,
}

impl Footprint {
    pub(super) fn of(master_dir: &Path, builds: &[u64]) -> Self {
        use ish_master::results::{ARCHIVE_INDEX, ARCHIVE_SIZES, ArchiveSizes};
        let layout = ish_master::results::ResultsLayout::new(master_dir.join("results"));
        let mut f = Self {
            db: tree_bytes(&master_dir.join("db")),
            plain: 0,
            index: 0,
            stored_archives: 0,
            zip: 0,
            tar_gz: 0,
        };
        for &id in builds {
            let dir = layout.build_dir(id);
            let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
            let index = [
                ARCHIVE_INDEX,
                ARCHIVE_SIZES,
                ish_master::archive::FAILURES_NAME,
            ]
            .map(size)
            .iter()
            .sum::<u64>();
            let stored =
                size(ish_master::archive::ZIP_NAME) + size(ish_master::archive::TAR_GZ_NAME);
            f.index += index;
            f.stored_archives += stored;
            f.plain += tree_bytes(&dir).saturating_sub(index + stored);
            if let Ok(Some(sizes)) = ArchiveSizes::read(&dir) {
                f.zip += sizes.zip.size;
                f.tar_gz += sizes.tar_gz.size;
            }
        }
        f
    }
}

/// Bytes of the regular files under `dir` (0 when it does not exist).
pub(super) fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => tree_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
