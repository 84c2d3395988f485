//! An application defining its own stages and bindings on conduit's engine: a user signs up,
//! and the `user.registered` event fans out through the topic exchange to email, SMS, analytics
//! and recommendations; the recommendations stage asks a profile service over request/reply;
//! analytics is ordered by user id.
//!
//! `cargo run --example signup`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conduit::rpc::{RpcError, RpcServer};
use conduit::{Emitter, Engine, EngineConfig, Envelope, Message, Outcome, Topology};

#[derive(Debug, Clone)]
struct SignUp {
    user: u64,
    email: String,
}

impl Message for SignUp {
    fn key(&self) -> u64 {
        self.user
    }
}

/// A subscriber that only counts.
type Counting = Box<dyn FnMut(&Envelope<SignUp>, &mut Emitter<SignUp>) -> Outcome + Send>;

fn counter(count: &Arc<AtomicU64>) -> impl Fn(usize) -> Counting + Send + Sync + 'static {
    let count = Arc::clone(count);
    move |_| {
        let count = Arc::clone(&count);
        Box::new(move |_: &Envelope<SignUp>, _: &mut Emitter<SignUp>| {
            count.fetch_add(1, Ordering::Relaxed);
            Outcome::Done
        })
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A profile service answering over request/reply (two server threads).
    let profiles = Arc::new(RpcServer::spawn("profiles", 2, 256, |user: u64| format!("segment-{}", user % 4))?);

    let mut topology = Topology::new();
    let accounts = topology.stage("accounts");
    let email = topology.stage("email");
    let sms = topology.stage("sms");
    let analytics = topology.stage("analytics");
    let recommendations = topology.stage("recommendations");
    topology.entry(accounts).ordered_by_key(analytics).dead_letter_unroutable(true);
    topology.bind(email, "user.registered")?;
    topology.bind(sms, "user.*")?;
    topology.bind(analytics, "#")?;
    topology.bind(recommendations, "*.registered")?;
    let registered = topology.publishes(accounts, "user.registered")?;

    topology.handler(accounts, move |_| {
        move |event: &Envelope<SignUp>, out: &mut Emitter<SignUp>| {
            if !event.msg.email.contains('@') {
                return Outcome::Reject("no valid email address".into());
            }
            out.publish(registered, event.msg.clone());
            Outcome::Done
        }
    });
    let (emails, texts, tracked, recommended) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    topology.handler(email, counter(&emails));
    topology.handler(sms, counter(&texts));
    topology.handler(analytics, counter(&tracked));
    let (service, done) = (Arc::clone(&profiles), Arc::clone(&recommended));
    topology.handler(recommendations, move |_| {
        let (service, done) = (Arc::clone(&service), Arc::clone(&done));
        move |event: &Envelope<SignUp>, _: &mut Emitter<SignUp>| match service
            .call(event.msg.user, Duration::from_millis(50))
        {
            Ok(_segment) => {
                done.fetch_add(1, Ordering::Relaxed);
                Outcome::Done
            }
            // A timeout is an ordinary outcome: try again later.
            Err(RpcError::Timeout) => Outcome::Retry("profile service timed out".into()),
            Err(error) => Outcome::Reject(error.to_string().into()),
        }
    });

    let config = EngineConfig::builder().workers(2).build()?;
    let engine = Engine::start(topology, &config)?;
    let signups = (1..=10_000u64).map(|user| SignUp {
        user,
        email: if user % 1_000 == 0 { "nobody".into() } else { format!("user{user}@example.com") },
    });
    engine.submit_many(signups)?;
    let report = engine.shutdown();

    println!(
        "signed up: {} emails, {} texts, {} tracked, {} recommended; {} rejected",
        emails.load(Ordering::Relaxed),
        texts.load(Ordering::Relaxed),
        tracked.load(Ordering::Relaxed),
        recommended.load(Ordering::Relaxed),
        report.snapshot.stage("accounts").map_or(0, |s| s.dead_lettered),
    );
    println!("profile service: {:?}", profiles.stats());
    Ok(())
}
