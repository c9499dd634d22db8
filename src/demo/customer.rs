//! The demo customer-data service (`demo.customer.v1.CustomerData`): the upstream that
//! `pdgate demo` protects and that the integration tests put behind the sidecar.
//!
//! Every person, address, phone number and e-mail address here is invented (phone numbers of
//! the placeholder form `0X0-0000-…`, e-mail under the reserved `example.jp`). The data lives in
//! memory; `UpdateContact` and `ImportContacts` change it for the life of the process.
//!
//! The service also records what reached it, for tests: [`CustomerService::calls`] counts
//! every method invocation (a denied call must leave it unchanged),
//! [`CustomerService::last_metadata`] returns the metadata of the latest request (`traceparent`
//! and `x-purpose` must pass through the sidecar), and [`CustomerService::open_streams`] counts
//! response streams still alive (a cancelled call must drop its upstream stream).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::proto::demo::customer_data_server::{CustomerData, CustomerDataServer};
use crate::proto::demo::{
    BillingStatement, CallHistory, CallRecord, ContactUpdate, Disclosure, DisclosureRequest,
    ExportRecord, ExportRequest, GetBillingStatementRequest, GetCallHistoryRequest,
    GetProfileRequest, GetUsageHistoryRequest, ImportSummary, Profile, SupportMessage,
    UpdateContactRequest, UsageHistory, UsageRecord, UsageStatistics, UsageStatisticsRequest,
};

/// The metadata key that names the data subjects of a call (repeatable; a value may also be a
/// comma-separated list). `ExportForInterconnect` exports exactly these customers.
pub const SUBJECT_METADATA: &str = "x-data-subject";

/// The demo service. Cloning is cheap and shares the data and the counters, so a test keeps a
/// clone to inspect while another clone serves.
#[derive(Debug, Clone, Default)]
pub struct CustomerService {
    shared: Arc<Shared>,
}

/// The response stream of `ExportForInterconnect`: one record per subject, `delay_ms` apart.
/// It does its work only when polled, so dropping it (the client cancelled) stops the export.
#[derive(Debug)]
pub struct ExportStream {
    pending: VecDeque<ExportRecord>,
    delay: Duration,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    _open: OpenStream,
}

/// The response stream of `SupportSession`: one reply per message received. A message with an
/// empty or unknown `customer_id` ends the session with that error status.
#[derive(Debug)]
pub struct SupportStream {
    inbound: Streaming<SupportMessage>,
    open: OpenStream,
}

#[derive(Debug)]
struct Shared {
    customers: RwLock<BTreeMap<String, Customer>>,
    calls: AtomicU64,
    last_metadata: Mutex<MetadataMap>,
    open_streams: AtomicUsize,
}

#[derive(Debug, Clone)]
struct Customer {
    profile: Profile,
    plan: &'static str,
    equipment: &'static str,
    statements: Vec<BillingStatement>,
    usage: Vec<UsageRecord>,
    calls: Vec<CallRecord>,
}

/// Counts one live response stream in [`CustomerService::open_streams`] until dropped.
#[derive(Debug)]
struct OpenStream(Arc<Shared>);

/// The months the demo data covers, oldest first.
const MONTHS: [&str; 4] = ["2025-07", "2025-08", "2025-09", "2025-10"];
const LATEST_MONTH: &str = MONTHS[MONTHS.len() - 1];

impl CustomerService {
    /// The service with its demo customers `cust-1` .. `cust-4`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The generated tonic service around this one. It takes gzip-compressed requests, and
    /// compresses its answers to a client that accepts gzip, as many services do.
    pub fn into_server(self) -> CustomerDataServer<Self> {
        CustomerDataServer::new(self)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .send_compressed(tonic::codec::CompressionEncoding::Gzip)
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        // Small gRPC messages would otherwise wait on Nagle; the benchmarks compare latencies.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(self.into_server())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }

    /// How many method invocations reached the service.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// The first ASCII value of `key` in the latest request's metadata.
    pub fn last_metadata(&self, key: &str) -> Option<String> {
        let metadata = lock(&self.shared.last_metadata);
        metadata.get(key)?.to_str().ok().map(str::to_owned)
    }

    /// Every ASCII value of `key` in the latest request's metadata.
    pub fn last_metadata_all(&self, key: &str) -> Vec<String> {
        let metadata = lock(&self.shared.last_metadata);
        metadata
            .get_all(key)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    }

    /// How many response streams (`ExportForInterconnect`, `SupportSession`) are still alive.
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams.load(Ordering::SeqCst)
    }

    /// Counts the call and keeps its metadata; every method starts here.
    fn enter<T>(&self, request: &Request<T>) {
        self.shared.calls.fetch_add(1, Ordering::SeqCst);
        *lock(&self.shared.last_metadata) = request.metadata().clone();
    }

    fn with_customer<R>(&self, id: &str, f: impl FnOnce(&Customer) -> R) -> Result<R, Status> {
        self.shared.with_customer(id, f)
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            customers: RwLock::new(demo_customers()),
            calls: AtomicU64::new(0),
            last_metadata: Mutex::new(MetadataMap::new()),
            open_streams: AtomicUsize::new(0),
        }
    }
}

impl Shared {
    fn with_customer<R>(&self, id: &str, f: impl FnOnce(&Customer) -> R) -> Result<R, Status> {
        require_id(id)?;
        let customers = self
            .customers
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        customers.get(id).map(f).ok_or_else(|| unknown(id))
    }

    /// Overwrites the non-empty contact fields; returns the new profile.
    fn update_contact(
        &self,
        id: &str,
        email: String,
        address: String,
        phone: String,
    ) -> Result<Profile, Status> {
        require_id(id)?;
        let mut customers = self
            .customers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let profile = &mut customers.get_mut(id).ok_or_else(|| unknown(id))?.profile;
        for (field, value) in [
            (&mut profile.email, email),
            (&mut profile.address, address),
            (&mut profile.phone, phone),
        ] {
            if !value.is_empty() {
                *field = value;
            }
        }
        Ok(profile.clone())
    }
}

impl Customer {
    fn usage_history(&self) -> UsageHistory {
        UsageHistory {
            customer_id: self.profile.customer_id.clone(),
            records: self.usage.clone(),
        }
    }

    fn call_history(&self) -> CallHistory {
        CallHistory {
            customer_id: self.profile.customer_id.clone(),
            calls: self.calls.clone(),
        }
    }
}

#[tonic::async_trait]
impl CustomerData for CustomerService {
    type ExportForInterconnectStream = ExportStream;
    type SupportSessionStream = SupportStream;

    async fn get_profile(
        &self,
        request: Request<GetProfileRequest>,
    ) -> Result<Response<Profile>, Status> {
        self.enter(&request);
        let id = &request.get_ref().customer_id;
        self.with_customer(id, |c| c.profile.clone())
            .map(Response::new)
    }

    async fn update_contact(
        &self,
        request: Request<UpdateContactRequest>,
    ) -> Result<Response<Profile>, Status> {
        self.enter(&request);
        let r = request.into_inner();
        self.shared
            .update_contact(&r.customer_id, r.email, r.address, r.phone)
            .map(Response::new)
    }

    /// An empty `month` is the latest statement.
    async fn get_billing_statement(
        &self,
        request: Request<GetBillingStatementRequest>,
    ) -> Result<Response<BillingStatement>, Status> {
        self.enter(&request);
        let GetBillingStatementRequest { customer_id, month } = request.get_ref();
        let statement = self.with_customer(customer_id, |c| {
            c.statements
                .iter()
                .rfind(|s| month.is_empty() || s.month == *month)
                .cloned()
        })?;
        statement.map(Response::new).ok_or_else(|| {
            Status::not_found(format!(
                "no billing statement for `{customer_id}` in `{month}`"
            ))
        })
    }

    async fn get_usage_history(
        &self,
        request: Request<GetUsageHistoryRequest>,
    ) -> Result<Response<UsageHistory>, Status> {
        self.enter(&request);
        self.with_customer(&request.get_ref().customer_id, Customer::usage_history)
            .map(Response::new)
    }

    async fn get_call_history(
        &self,
        request: Request<GetCallHistoryRequest>,
    ) -> Result<Response<CallHistory>, Status> {
        self.enter(&request);
        self.with_customer(&request.get_ref().customer_id, Customer::call_history)
            .map(Response::new)
    }

    /// Exports the customers named in `x-data-subject`, or all of them when none is named.
    /// Any unknown subject fails the whole call before a record is sent.
    async fn export_for_interconnect(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        self.enter(&request);
        let mut subjects = Vec::new();
        for value in request.metadata().get_all(SUBJECT_METADATA) {
            let value = value.to_str().map_err(|_| {
                Status::invalid_argument(format!("`{SUBJECT_METADATA}` is not ASCII"))
            })?;
            for id in value.split(',').map(str::trim) {
                if id.is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "empty `{SUBJECT_METADATA}` value"
                    )));
                }
                subjects.push(id.to_owned());
            }
        }
        let pending = {
            let customers = self
                .shared
                .customers
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if subjects.is_empty() {
                subjects = customers.keys().cloned().collect();
            }
            subjects
                .iter()
                .map(|id| {
                    customers
                        .get(id)
                        .map(export_record)
                        .ok_or_else(|| unknown(id))
                })
                .collect::<Result<VecDeque<_>, _>>()?
        };
        Ok(Response::new(ExportStream {
            pending,
            delay: Duration::from_millis(u64::from(request.get_ref().delay_ms)),
            pause: None,
            _open: OpenStream::new(&self.shared),
        }))
    }

    /// Aggregates over every customer; an empty `month` is the latest month.
    async fn get_usage_statistics(
        &self,
        request: Request<UsageStatisticsRequest>,
    ) -> Result<Response<UsageStatistics>, Status> {
        self.enter(&request);
        let month = match request.get_ref().month.as_str() {
            "" => LATEST_MONTH,
            m => m,
        };
        let customers = self
            .shared
            .customers
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let (mut count, mut data_mb, mut minutes) = (0_i64, 0_i64, 0_i64);
        for record in customers.values().flat_map(|c| &c.usage) {
            if record.month == month {
                count += 1;
                data_mb += record.data_mb;
                minutes += record.call_minutes;
            }
        }
        if count == 0 {
            return Err(Status::not_found(format!("no usage recorded in `{month}`")));
        }
        Ok(Response::new(UsageStatistics {
            month: month.to_owned(),
            customers: count,
            total_data_mb: data_mb,
            average_call_minutes: minutes / count,
        }))
    }

    async fn disclose_held_data(
        &self,
        request: Request<DisclosureRequest>,
    ) -> Result<Response<Disclosure>, Status> {
        self.enter(&request);
        self.with_customer(&request.get_ref().customer_id, |c| Disclosure {
            profile: Some(c.profile.clone()),
            statements: c.statements.clone(),
            usage: Some(c.usage_history()),
            calls: Some(c.call_history()),
        })
        .map(Response::new)
    }

    /// Applies updates as they arrive; an update with an empty `customer_id` fails the call
    /// (the updates before it stay applied).
    async fn import_contacts(
        &self,
        request: Request<Streaming<ContactUpdate>>,
    ) -> Result<Response<ImportSummary>, Status> {
        self.enter(&request);
        let mut updates = request.into_inner();
        let mut summary = ImportSummary::default();
        while let Some(u) = updates.message().await? {
            require_id(&u.customer_id)?;
            match self
                .shared
                .update_contact(&u.customer_id, u.email, u.address, u.phone)
            {
                Ok(_) => summary.updated += 1,
                Err(status) if status.code() == tonic::Code::NotFound => summary.unknown += 1,
                Err(status) => return Err(status),
            }
        }
        Ok(Response::new(summary))
    }

    async fn support_session(
        &self,
        request: Request<Streaming<SupportMessage>>,
    ) -> Result<Response<SupportStream>, Status> {
        self.enter(&request);
        Ok(Response::new(SupportStream {
            inbound: request.into_inner(),
            open: OpenStream::new(&self.shared),
        }))
    }
}

impl Stream for ExportStream {
    type Item = Result<ExportRecord, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(pause) = this.pause.as_mut() {
            ready!(pause.as_mut().poll(cx));
            this.pause = None;
        }
        let Some(record) = this.pending.pop_front() else {
            return Poll::Ready(None);
        };
        if !this.pending.is_empty() && !this.delay.is_zero() {
            this.pause = Some(Box::pin(tokio::time::sleep(this.delay)));
        }
        Poll::Ready(Some(Ok(record)))
    }
}

impl Stream for SupportStream {
    type Item = Result<SupportMessage, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let message = match ready!(Pin::new(&mut this.inbound).poll_next(cx)) {
            Some(Ok(message)) => message,
            other => return Poll::Ready(other),
        };
        let reply = this
            .open
            .0
            .with_customer(&message.customer_id, |c| SupportMessage {
                customer_id: message.customer_id.clone(),
                text: format!(
                    "{} 様: plan `{}`, equipment `{}` (re: {})",
                    c.profile.name, c.plan, c.equipment, message.text
                ),
            });
        Poll::Ready(Some(reply))
    }
}

impl OpenStream {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.open_streams.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(shared))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn require_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("`customer_id` is required"));
    }
    Ok(())
}

fn unknown(id: &str) -> Status {
    Status::not_found(format!("no customer `{id}`"))
}

fn export_record(c: &Customer) -> ExportRecord {
    ExportRecord {
        customer_id: c.profile.customer_id.clone(),
        name: c.profile.name.clone(),
        address: c.profile.address.clone(),
        phone: c.profile.phone.clone(),
        data_mb_last_month: c.usage.last().map_or(0, |u| u.data_mb),
    }
}

/// The fictitious customers, keyed by id.
fn demo_customers() -> BTreeMap<String, Customer> {
    // (name, e-mail user, address, plan, equipment, monthly fee, data MB, call minutes)
    let people = [
        (
            "山田 太郎",
            "taro.yamada",
            "東京都千代田区見本町1-2-3",
            "Hikari 1G Family",
            "ONU HX-100 + Wi-Fi router WR-10",
            5_720,
            182_000,
            35,
        ),
        (
            "佐藤 花子",
            "hanako.sato",
            "大阪府大阪市架空区例町4-5-6 サンプルハイツ202",
            "Hikari 10G Mansion",
            "ONU HX-1000",
            4_950,
            364_000,
            12,
        ),
        (
            "鈴木 一郎",
            "ichiro.suzuki",
            "北海道札幌市見本区仮町7-8-9",
            "Mobile 20GB",
            "Smartphone SP-3 (SIM card)",
            2_980,
            15_400,
            120,
        ),
        (
            "高橋 美咲",
            "misaki.takahashi",
            "福岡県福岡市架空区試験町10-11",
            "Hikari 1G + Hikari Phone",
            "ONU HX-100 + VoIP adapter VA-2",
            6_270,
            95_000,
            64,
        ),
    ];
    let mut customers = BTreeMap::new();
    for (n, (name, user, address, plan, equipment, fee, mb, minutes)) in (1_i64..).zip(people) {
        let id = format!("cust-{n}");
        let statements = (0_i64..)
            .zip(MONTHS)
            .map(|(i, month)| BillingStatement {
                customer_id: id.clone(),
                month: month.to_owned(),
                amount_yen: fee + 110 * ((i + n) % 3),
                // The latest month is not yet paid.
                paid: month != LATEST_MONTH,
            })
            .collect();
        let usage = (0_i64..)
            .zip(MONTHS)
            .map(|(i, month)| UsageRecord {
                month: month.to_owned(),
                data_mb: mb + 1_000 * i * n,
                call_minutes: minutes + 3 * i,
            })
            .collect();
        let calls = [(3, "03-0000-1111", 184), (17, "06-0000-2222", 62)]
            .into_iter()
            .map(|(day, callee, seconds)| CallRecord {
                started_at: format!("2025-10-{day:02}T{:02}:15:00+09:00", 8 + n),
                callee: callee.to_owned(),
                seconds: seconds * n,
            })
            .collect();
        let profile = Profile {
            customer_id: id.clone(),
            name: name.to_owned(),
            email: format!("{user}@example.jp"),
            address: address.to_owned(),
            phone: format!("090-0000-{n:04}"),
        };
        let customer = Customer {
            profile,
            plan,
            equipment,
            statements,
            usage,
            calls,
        };
        customers.insert(id, customer);
    }
    customers
}

#[cfg(test)]
mod tests;
