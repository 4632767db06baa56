//! The contract every storage backend passes: what the owners of each domain rely on, checked
//! through the traits only. A backend's tests call [`run_all`] with a function that opens its
//! database; calling it again must reopen the same database (what a restarted master sees).
//! The sled backend runs it in `storage::sled`'s tests; PostgreSQL (issue 16) will run the same.
use super::{
    AuditStore, BuildBatch, BuildStore, BuildWrite, CatalogKind, CatalogRecord, CatalogStore,
    Counters, ExecutionRecord, PutOutcome, ScheduleStore, Stores,
};
use ish_core::proto;
use std::collections::HashMap;
use std::sync::Arc;

/// Runs every part of the contract; `open` opens (or reopens) one database.
pub async fn run_all(open: &dyn Fn() -> Stores) {
    let s = open();
    builds(&*s.builds).await;
    catalog(&*s.catalog).await;
    catalog_names_race(s.catalog.clone()).await;
    schedules(&*s.schedules).await;
    fires_race(s.schedules.clone()).await;
    audit(&*s.audit).await;
    let before = Snapshot::take(&s).await;
    drop(s);
    let s = open();
    let after = Snapshot::take(&s).await;
    assert_eq!(
        before, after,
        "a reopened database holds what was acknowledged"
    );
    let seq = s.audit.append(5, b"after reopen".to_vec()).await.unwrap();
    assert!(seq > before.last_audit_seq);
}

/// What a reopen must preserve, read through the traits.
#[derive(Debug, PartialEq)]
struct Snapshot {
    builds: Vec<proto::StoredBuild>,
    atoms: Vec<proto::Atom>,
    attempts: Vec<(u32, u32)>,
    overrides: Vec<String>,
    timings: HashMap<String, f64>,
    projects: Vec<CatalogRecord>,
    schedules: Vec<(String, Vec<u8>)>,
    executions: Vec<ExecutionRecord>,
    audit: Vec<super::AuditRecord>,
    counters: Counters,
    last_audit_seq: u64,
}

impl Snapshot {
    async fn take(s: &Stores) -> Self {
        let audit = s.audit.list(i64::MIN..i64::MAX, None, 1000).await.unwrap();
        Self {
            builds: s.builds.load_builds().await.unwrap(),
            atoms: s.builds.load_atoms_range(7, 0..u32::MAX).await.unwrap(),
            attempts: s.builds.load_attempts_range(7, 0..u32::MAX).await.unwrap(),
            overrides: s.builds.atoms_override(9).await.unwrap(),
            timings: s
                .builds
                .timings("p", "job", &["a".to_string(), "b".to_string()])
                .await
                .unwrap(),
            projects: s
                .catalog
                .list(CatalogKind::Project, String::new(), String::new(), 1000)
                .await
                .unwrap(),
            schedules: s.schedules.list_schedules().await.unwrap(),
            executions: s
                .schedules
                .list_executions(i64::MIN..i64::MAX, None, 1000)
                .await
                .unwrap(),
            counters: s.builds.load_counters().await.unwrap(),
            last_audit_seq: audit.iter().map(|a| a.seq).max().unwrap_or(0),
            audit,
        }
    }
}

/// Counters `builds` stores.
const LAST_BUILD_ID: u64 = 2;
const ATTEMPTS_END: u64 = 21;

fn atom(subjob: u32, id: u32) -> proto::Atom {
    proto::Atom {
        id,
        subjob_id: subjob,
        command_string: format!("export T=\"{subjob}.{id}\";"),
        ..Default::default()
    }
}

fn record(id: u64, state: proto::BuildState) -> proto::StoredBuild {
    proto::StoredBuild {
        build: Some(proto::Build {
            id,
            state: state as i32,
            ..Default::default()
        }),
        project_key: "p".into(),
        ..Default::default()
    }
}

/// Commits one batch of writes.
async fn commit(s: &dyn BuildStore, writes: Vec<BuildWrite>) {
    let mut batch = BuildBatch::default();
    for w in writes {
        batch.push(w);
    }
    s.commit(Arc::new(batch)).await.unwrap();
}

/// Builds and results. Expects a fresh database.
pub async fn builds(s: &dyn BuildStore) {
    assert_eq!(
        s.load_counters().await.unwrap(),
        Counters {
            last_build_id: 0,
            next_attempt: 1
        },
        "a fresh database"
    );
    commit(
        s,
        vec![
            BuildWrite::LastBuildId(1),
            BuildWrite::Build(Box::new(record(2, proto::BuildState::Queued))),
            BuildWrite::Build(Box::new(record(1, proto::BuildState::Building))),
            BuildWrite::LastBuildId(LAST_BUILD_ID),
            BuildWrite::AttemptsReservedTo(ATTEMPTS_END),
            // A record is replaced, not added.
            BuildWrite::Build(Box::new(record(2, proto::BuildState::Finished))),
        ],
    )
    .await;
    assert_eq!(
        s.load_counters().await.unwrap(),
        Counters {
            last_build_id: LAST_BUILD_ID,
            next_attempt: ATTEMPTS_END
        }
    );
    // The listing ascends by id.
    let ids: Vec<_> = s
        .load_builds()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.build.map(|b| (b.id, b.state)).unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            (1, proto::BuildState::Building as i32),
            (2, proto::BuildState::Finished as i32)
        ]
    );

    // A grouping spread over several chunks, results over it, neighbouring builds untouched.
    let grouping: Vec<proto::Atom> = (0..800u32)
        .flat_map(|sj| (0..sj % 5 + 1).map(move |id| atom(sj, id)))
        .collect();
    assert!(grouping.len() > 2 * super::GROUPING_CHUNK_ATOMS);
    let groupings = [6, 7, 8]
        .map(|b| BuildWrite::grouping(b, &grouping))
        .to_vec();
    commit(s, groupings).await;
    let mut expected = grouping.clone();
    let mut results = Vec::new();
    for a in expected
        .iter_mut()
        .filter(|a| (a.subjob_id + a.id) % 4 == 0)
    {
        a.exit_code = Some(1);
        a.slave = "s1".into();
        results.push(BuildWrite::Atom {
            build: 7,
            atom: a.clone(),
        });
    }
    commit(s, results).await;
    assert_eq!(s.load_atoms_range(7, 0..u32::MAX).await.unwrap(), expected);
    assert_eq!(s.load_atoms_range(6, 0..u32::MAX).await.unwrap(), grouping);
    for (lo, hi) in [(0, 1), (99, 250), (340, 345), (799, 800), (800, 900)] {
        let want: Vec<_> = expected
            .iter()
            .filter(|a| (lo..hi).contains(&a.subjob_id))
            .cloned()
            .collect();
        assert_eq!(
            s.load_atoms_range(7, lo..hi).await.unwrap(),
            want,
            "{lo}..{hi}"
        );
    }
    for some in [
        &expected[0],
        &expected[123],
        &expected[1500],
        &expected[expected.len() - 1],
    ] {
        assert_eq!(
            s.get_atom(7, some.subjob_id, some.id)
                .await
                .unwrap()
                .as_ref(),
            Some(some)
        );
    }
    assert_eq!(s.get_atom(7, 0, 1).await.unwrap(), None);
    assert_eq!(s.get_atom(5, 0, 0).await.unwrap(), None);

    let attempts = |build, subjob, attempts| BuildWrite::Attempts {
        build,
        subjob,
        attempts,
    };
    commit(
        s,
        vec![
            attempts(7, 3, 2),
            attempts(7, 1, 4),
            attempts(7, 3, 5),
            attempts(6, 0, 9),
        ],
    )
    .await;
    assert_eq!(
        s.load_attempts_range(7, 0..u32::MAX).await.unwrap(),
        [(1, 4), (3, 5)]
    );
    assert_eq!(s.load_attempts_range(7, 2..4).await.unwrap(), [(3, 5)]);

    // A new grouping replaces a build's atoms and dispatch counts, not its neighbours'.
    let regrouped = vec![atom(0, 0), atom(0, 1)];
    commit(s, vec![BuildWrite::grouping(6, &regrouped)]).await;
    assert_eq!(s.load_atoms_range(6, 0..u32::MAX).await.unwrap(), regrouped);
    assert!(
        s.load_attempts_range(6, 0..u32::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.get_atom(6, 3, 0).await.unwrap(), None);
    assert_eq!(s.load_atoms_range(8, 0..u32::MAX).await.unwrap(), grouping);

    let over = vec!["export A=1;".to_string(), "export A=2;".to_string()];
    let set = |build, atoms| BuildWrite::AtomsOverride { build, atoms };
    commit(
        s,
        vec![
            set(9, over.clone()),
            set(10, vec!["x".into()]),
            set(10, Vec::new()),
        ],
    )
    .await;
    assert_eq!(s.atoms_override(9).await.unwrap(), over);
    assert!(s.atoms_override(10).await.unwrap().is_empty());
    assert!(s.atoms_override(11).await.unwrap().is_empty());

    let owned = |v: &[(&str, f64)]| v.iter().map(|(a, t)| (a.to_string(), *t)).collect();
    s.merge_timings("p".into(), "job".into(), owned(&[("a", 1.0), ("b", 2.0)]))
        .await
        .unwrap();
    s.merge_timings("p".into(), "job".into(), owned(&[("b", 3.0)]))
        .await
        .unwrap();
    s.merge_timings("p".into(), "other".into(), owned(&[("a", 9.0)]))
        .await
        .unwrap();
    let t = s
        .timings("p", "job", &["a".into(), "b".into(), "c".into()])
        .await
        .unwrap();
    assert_eq!(t, HashMap::from([("a".into(), 1.0), ("b".into(), 3.0)]));
    // Project and job names never run into each other.
    assert!(
        s.timings("pj", "ob", &["a".into()])
            .await
            .unwrap()
            .is_empty()
    );
}

fn rec(kind: CatalogKind, id: &str, scope: &str, name: &str) -> CatalogRecord {
    CatalogRecord {
        kind,
        id: id.into(),
        scope: scope.into(),
        name: name.into(),
        body: format!("body of {id}").into_bytes(),
    }
}

/// Accounts, projects, jobs, tokens, members. Expects a fresh database.
pub async fn catalog(s: &dyn CatalogStore) {
    use CatalogKind::{Job, Project};
    let put = |r: CatalogRecord, create: bool| s.put(r, create);
    assert_eq!(
        put(rec(Project, "p1", "", "web"), true).await.unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(
        put(rec(Project, "p1", "", "other"), true).await.unwrap(),
        PutOutcome::IdTaken
    );
    assert_eq!(
        put(rec(Project, "p2", "", "web"), true).await.unwrap(),
        PutOutcome::NameTaken
    );
    assert_eq!(
        s.get(Project, "p2".into()).await.unwrap(),
        None,
        "a refusal writes nothing"
    );
    // Names are unique per kind and scope only.
    for (kind, id, scope) in [(Job, "j1", "p1"), (Job, "j2", "p9"), (Project, "p3", "x")] {
        assert_eq!(
            put(rec(kind, id, scope, "web"), true).await.unwrap(),
            PutOutcome::Stored,
            "{id}"
        );
    }
    assert_eq!(
        s.find(Job, "p1".into(), "web".into()).await.unwrap(),
        Some(rec(Job, "j1", "p1", "web"))
    );
    assert_eq!(s.find(Job, "p1".into(), "nope".into()).await.unwrap(), None);

    // Renaming frees the old name and takes the new one; an update cannot move scope.
    let mut renamed = rec(Project, "p1", "elsewhere", "web-2");
    renamed.body = b"new body".to_vec();
    assert_eq!(
        put(renamed.clone(), false).await.unwrap(),
        PutOutcome::Stored
    );
    let got = s.get(Project, "p1".into()).await.unwrap().unwrap();
    assert_eq!((got.scope.as_str(), got.name.as_str()), ("", "web-2"));
    assert_eq!(got.body, b"new body");
    assert_eq!(
        s.find(Project, String::new(), "web".into()).await.unwrap(),
        None
    );
    assert_eq!(
        put(rec(Project, "p2", "", "web"), true).await.unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(
        put(rec(Project, "p2", "", "web-2"), false).await.unwrap(),
        PutOutcome::NameTaken
    );
    assert_eq!(
        s.get(Project, "p2".into()).await.unwrap().unwrap().name,
        "web"
    );
    assert_eq!(
        put(rec(Project, "ghost", "", "ghost"), false)
            .await
            .unwrap(),
        PutOutcome::Missing
    );

    // Listing by name, paged with an exclusive cursor, within its scope only.
    for i in 0..25 {
        let id = format!("pp{i:02}");
        let name = format!("proj-{i:02}");
        put(rec(Project, &id, "", &name), true).await.unwrap();
    }
    let mut names = Vec::new();
    let mut after = String::new();
    loop {
        let page = s
            .list(Project, String::new(), after.clone(), 10)
            .await
            .unwrap();
        assert!(page.len() <= 10);
        let Some(last) = page.last() else { break };
        after = last.name.clone();
        names.extend(page.into_iter().map(|r| r.name));
    }
    let mut want: Vec<String> = (0..25).map(|i| format!("proj-{i:02}")).collect();
    want.extend(["web".to_string(), "web-2".to_string()]);
    assert_eq!(names, want);
    assert_eq!(
        s.list(Job, "p1".into(), String::new(), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // Deleting frees the name.
    assert!(s.delete(Project, "p2".into()).await.unwrap());
    assert!(!s.delete(Project, "p2".into()).await.unwrap());
    assert_eq!(
        s.find(Project, String::new(), "web".into()).await.unwrap(),
        None
    );
    assert_eq!(
        put(rec(Project, "p4", "", "web"), true).await.unwrap(),
        PutOutcome::Stored
    );
}

/// Many owners creating the same name at once: exactly one wins.
pub async fn catalog_names_race(s: Arc<dyn CatalogStore>) {
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.put(
                    rec(CatalogKind::Account, &format!("a{i}"), "", "admin"),
                    true,
                )
                .await
                .unwrap()
            })
        })
        .collect();
    let mut stored = 0;
    for t in tasks {
        if t.await.unwrap() == PutOutcome::Stored {
            stored += 1;
        }
    }
    assert_eq!(stored, 1, "one account named admin");
    let all = s
        .list(CatalogKind::Account, String::new(), String::new(), 100)
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
}

fn execution(id: &str, schedule: &str, at_ms: i64) -> ExecutionRecord {
    ExecutionRecord {
        id: id.into(),
        schedule_id: schedule.into(),
        at_ms,
        body: format!("state of {id}").into_bytes(),
    }
}

/// Schedules, fires and executions. Expects a fresh database.
pub async fn schedules(s: &dyn ScheduleStore) {
    s.put_schedule("s2".into(), b"every minute".to_vec())
        .await
        .unwrap();
    s.put_schedule("s1".into(), b"hourly".to_vec())
        .await
        .unwrap();
    s.put_schedule("s1".into(), b"daily".to_vec())
        .await
        .unwrap();
    assert_eq!(
        s.get_schedule("s1".into()).await.unwrap().as_deref(),
        Some(&b"daily"[..])
    );
    assert_eq!(
        s.list_schedules().await.unwrap(),
        [
            ("s1".to_string(), b"daily".to_vec()),
            ("s2".to_string(), b"every minute".to_vec())
        ]
    );
    s.put_schedule("gone".into(), vec![]).await.unwrap();
    assert!(s.delete_schedule("gone".into()).await.unwrap());
    assert!(!s.delete_schedule("gone".into()).await.unwrap());
    assert_eq!(s.get_schedule("gone".into()).await.unwrap(), None);

    // A tick fires once; a refused claim writes nothing.
    assert!(
        s.claim_fire("s1".into(), 60_000, execution("e1", "s1", 60_000))
            .await
            .unwrap()
    );
    assert!(
        !s.claim_fire("s1".into(), 60_000, execution("e1b", "s1", 60_000))
            .await
            .unwrap()
    );
    assert_eq!(s.get_execution("e1b".into()).await.unwrap(), None);
    // Same tick of another schedule, and the next tick of this one, are their own fires.
    for (id, sched, at) in [("e2", "s2", 60_000), ("e3", "s1", 120_000)] {
        assert!(
            s.claim_fire(sched.into(), at, execution(id, sched, at))
                .await
                .unwrap()
        );
    }
    // A manual run, and a state change of e1.
    s.put_execution(execution("m1", "s2", -5)).await.unwrap();
    let mut e1 = execution("e1", "s1", 60_000);
    e1.body = b"succeeded".to_vec();
    s.put_execution(e1.clone()).await.unwrap();
    assert_eq!(
        s.get_execution("e1".into()).await.unwrap(),
        Some(e1.clone())
    );

    // Listing: by (time, id), end exclusive, paged with a cursor.
    let ids = |v: Vec<ExecutionRecord>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s
            .list_executions(i64::MIN..i64::MAX, None, 100)
            .await
            .unwrap()),
        ["m1", "e1", "e2", "e3"]
    );
    assert_eq!(
        ids(s.list_executions(0..120_000, None, 100).await.unwrap()),
        ["e1", "e2"]
    );
    let first = s.list_executions(0..i64::MAX, None, 1).await.unwrap();
    assert_eq!(ids(first.clone()), ["e1"]);
    let next = s
        .list_executions(0..i64::MAX, Some((first[0].at_ms, first[0].id.clone())), 2)
        .await
        .unwrap();
    assert_eq!(ids(next), ["e2", "e3"]);
    // An execution whose time changes moves in the listing (no stale index entry).
    s.put_execution(execution("m1", "s2", 200_000))
        .await
        .unwrap();
    assert_eq!(
        ids(s
            .list_executions(i64::MIN..i64::MAX, None, 100)
            .await
            .unwrap()),
        ["e1", "e2", "e3", "m1"]
    );
}

/// Many owners claiming the same fire at once (two masters for a moment): exactly one wins.
pub async fn fires_race(s: Arc<dyn ScheduleStore>) {
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let id = format!("race{i}");
                s.claim_fire("race".into(), 7_000, execution(&id, "race", 7_000))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 1);
    let race: Vec<_> = s
        .list_executions(7_000..7_001, None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.schedule_id == "race")
        .collect();
    assert_eq!(race.len(), 1, "one execution for one fire");
}

/// The audit log. Expects a fresh database.
pub async fn audit(s: &dyn AuditStore) {
    let mut seqs = Vec::new();
    // Appended out of time order (clocks step back): listed by time, then sequence.
    for (at, what) in [(300, "c"), (100, "a"), (200, "b"), (200, "b2")] {
        seqs.push(s.append(at, what.as_bytes().to_vec()).await.unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(seqs[0] > 0);
    let bodies = |v: &[super::AuditRecord]| {
        v.iter()
            .map(|r| String::from_utf8(r.body.clone()).unwrap())
            .collect::<Vec<_>>()
    };
    let all = s.list(i64::MIN..i64::MAX, None, 100).await.unwrap();
    assert_eq!(bodies(&all), ["a", "b", "b2", "c"]);
    assert_eq!(all[0].at_ms, 100);
    assert_eq!(
        bodies(&s.list(150..300, None, 100).await.unwrap()),
        ["b", "b2"]
    );
    let page = s.list(0..1000, None, 2).await.unwrap();
    assert_eq!(bodies(&page), ["a", "b"]);
    let last = page.last().unwrap();
    let rest = s
        .list(0..1000, Some((last.at_ms, last.seq)), 10)
        .await
        .unwrap();
    assert_eq!(bodies(&rest), ["b2", "c"]);
}
