#!/usr/bin/perl

# The Grafana dashboard and the Prometheus alerting rules of conf-examples
# work against what a gateway exports: the rules pass promtool's checks
# and unit tests (synthetic series: each alert fires when it should, and
# not when it should not); then a real Prometheus (Debian's package)
# scrapes gateways with a dead key, a pool whose keys all cool, a
# workspace near its token budget, another near its budget in dollars
# (at the shipped list prices) and clients that got 429s, evaluates every
# query of every panel of the dashboard, and fires the alerts it should.

use strict;
use warnings;

use lib 't/lib';

use Cwd ();
use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Conversation;
use Ratepool::Test;

plan skip_all => 'no promtool or prometheus (make deps installs them)'
    unless -x '/usr/bin/promtool' && -x '/usr/bin/prometheus';

my $DASHBOARD = 'conf-examples/grafana-dashboard.json';
my $ALERTS = 'conf-examples/prometheus-alerts.yml';

my $t = Ratepool::Test->new;
my $dir = $t->testdir;
my $t0 = time;
my $ROOT = Cwd::getcwd();

sub slurp {
    my ($file) = @_;
    open my $fh, '<', $file or die "$file: $!\n";
    local $/;
    return scalar <$fh>;
}

# --- the dashboard's JSON ----------------------------------------------------

my $dash = eval { decode_json(slurp($DASHBOARD)) };
ok($dash, 'the dashboard is JSON') or diag $@;
$dash ||= {};

my @panels = @{ $dash->{panels} || [] };
my @rows = grep { $_->{type} eq 'row' } @panels;
my @shown = grep { $_->{type} ne 'row' } @panels;

is($dash->{uid}, 'ratepool', 'its uid is "ratepool"');
ok(!defined $dash->{id}, 'it has no id of a Grafana instance');
ok(scalar(grep { $_->{name} eq 'DS_PROMETHEUS' && $_->{type} eq 'datasource'
                 && $_->{pluginId} eq 'prometheus' }
          @{ $dash->{__inputs} || [] }),
   '__inputs declares DS_PROMETHEUS, a Prometheus data source');

is_deeply([ sort map { $_->{title} } @rows ],
          [ sort 'Overview', 'Keys', 'Orgs', 'Waiting & latency',
                 'Workspaces & clients', 'Money', 'Cache', 'Store' ],
          'its rows');
cmp_ok(scalar @shown, '>=', 30, scalar(@shown) . ' panels');

my %ids;
$ids{ $_->{id} // 'none' }++ for @panels;
is_deeply([ grep { $ids{$_} > 1 || $_ eq 'none' } sort keys %ids ], [],
          'every panel has an id of its own');

sub ds_ok {
    my ($ds) = @_;
    return ref $ds eq 'HASH' && ($ds->{type} // '') eq 'prometheus'
           && ($ds->{uid} // '') eq '${DS_PROMETHEUS}';
}

is_deeply([ map { $_->{title} } grep { !ds_ok($_->{datasource}) } @panels ],
          [], 'every panel\'s data source is ${DS_PROMETHEUS}');
is_deeply([ map { $_->{title} }
            grep { my $p = $_; @{ $p->{targets} || [] } == 0
                   || grep { !ds_ok($_->{datasource}) || !$_->{expr} }
                      @{ $p->{targets} } } @shown ],
          [], 'and every query\'s, each with an expression');

# no two panels on the same place of the grid, none wider than it
my @overlaps;
for my $i (0 .. $#panels) {
    my $p = $panels[$i]{gridPos};
    push @overlaps, "$panels[$i]{title} is off the grid"
        if $p->{x} < 0 || $p->{x} + $p->{w} > 24;
    for my $j ($i + 1 .. $#panels) {
        my $q = $panels[$j]{gridPos};
        push @overlaps, "$panels[$i]{title} / $panels[$j]{title}"
            if $p->{x} < $q->{x} + $q->{w} && $q->{x} < $p->{x} + $p->{w}
               && $p->{y} < $q->{y} + $q->{h} && $q->{y} < $p->{y} + $p->{h};
    }
}
is_deeply(\@overlaps, [], 'no panels overlap');

# an import asks for the plugins it needs
my %required = map { $_->{id} => 1 } @{ $dash->{__requires} || [] };
is_deeply([ grep { !$required{$_} } 'grafana', 'prometheus',
                                    map { $_->{type} } @shown ],
          [], '__requires names Grafana, Prometheus and every panel type');

# template variables: each a label_values() query with an "All" of .*
my %var;
for my $v (@{ $dash->{templating}{list} || [] }) {
    my $q = ref $v->{query} ? $v->{query}{query} : $v->{query};
    my ($metric, $label) = ($q // '') =~ /^label_values\((\w+), (\w+)\)$/;
    ok(ds_ok($v->{datasource}) && $metric && $label eq $v->{name}
       && $v->{includeAll} && defined $v->{allValue},
       "variable \$$v->{name} is label_values(...) with an All value")
        or diag explain $v;
    $var{ $v->{name} } = { all => $v->{allValue}, metric => $metric };
}
ok($var{pool} && $var{workspace}, 'there are $pool and $workspace');

# what Grafana puts for them: the All value, and builtins for a short test
my %builtin = (__rate_interval => '1m', __interval => '15s',
               __range => '1m');

sub expand {
    my ($expr) = @_;
    $expr =~ s/\$\{?(\w+)\}?/
        exists $var{$1} ? $var{$1}{all} : $builtin{$1} \/\/ "\$$1"/ge;
    return $expr;
}

my @queries;    # [ panel title, row title, expression ]
my $row = '';
for my $p (@panels) {
    $row = $p->{title} if $p->{type} eq 'row';
    push @queries, map { [ $p->{title}, $row, expand($_->{expr}) ] }
                   @{ $p->{targets} || [] };
}
is_deeply([ map { "$_->[0]: $_->[2]" } grep { $_->[2] =~ /\$/ } @queries ],
          [], 'every variable in a query is known');

# --- the rules, checked and unit-tested -----------------------------------

my $out = `promtool check rules $ALERTS 2>&1`;
is($?, 0, 'promtool check rules passes') or diag $out;

my $rules = slurp($ALERTS);
my @alerts = $rules =~ /^\s*- alert: (\w+)/mg;
is_deeply([ sort @alerts ],
          [ sort qw(RatepoolAllKeysCooling RatepoolKeyDead RatepoolStoreDown
                    RatepoolBudgetNearlySpent RatepoolClientsGet429s
                    RatepoolGatewayErrors RatepoolQueueLong
                    RatepoolSpendingBudgetNearlySpent
                    RatepoolRequestsWaitLong) ],
          'the alerts, in one group') or diag $rules;
like($rules, qr/^  - name: ratepool$/m, 'which is "ratepool"');

my @for = $rules =~ /^\s+for: (\S+)$/mg;
my @severity = $rules =~ /^\s+severity: (critical|warning)$/mg;
my @summary = $rules =~ /^\s+summary: /mg;
my @description = $rules =~ /^\s+description: /mg;
is(scalar @for, scalar @alerts, 'each has a for:');
is(scalar @severity, scalar @alerts, 'a severity');
ok(@summary == @alerts && @description == @alerts,
   'a summary and a description');

# Synthetic series, a sample a minute, against the rules as shipped (their
# for: is in the expectations). Each series carries job and instance, as
# a scrape's do: the alerts keep them.
$t->write_file('alerts.yml', $rules);

my $gw = 'job: ratepool, instance: "gw1:80"';
my $st = 'ratepool_key_state{job="ratepool",instance="gw1:80"';
my $pa = 'ratepool_pool_answers_total{job="ratepool",instance="gw1:80"';
my $bu = '{job="ratepool",instance="gw1:80",workspace';
my $bt = 'ratepool_workspace_budget_tokens';
my $bused = 'ratepool_workspace_budget_used_tokens';
my $wa = 'ratepool_pool_waiting{job="ratepool",instance="gw1:80"';
my $ow = 'ratepool_pool_oldest_wait_seconds{job="ratepool",instance="gw1:80"';
my $bd = 'ratepool_workspace_budget_usd';
my $bdused = 'ratepool_workspace_budget_used_usd';

$t->write_file('alerts-test.yml', <<"EOF");
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # pool p: k1 cools for good, k2 is ok until 3m, then dead
      - series: '$st,pool="p",key="k1",org="o1",state="ok"}'
        values: '0x10'
      - series: '$st,pool="p",key="k1",org="o1",state="limited"}'
        values: '0x10'
      - series: '$st,pool="p",key="k1",org="o1",state="cooling"}'
        values: '1x10'
      - series: '$st,pool="p",key="k1",org="o1",state="dead"}'
        values: '0x10'
      - series: '$st,pool="p",key="k2",org="o2",state="ok"}'
        values: '1 1 1 0x7'
      - series: '$st,pool="p",key="k2",org="o2",state="limited"}'
        values: '0x10'
      - series: '$st,pool="p",key="k2",org="o2",state="cooling"}'
        values: '0x10'
      - series: '$st,pool="p",key="k2",org="o2",state="dead"}'
        values: '0 0 0 1x7'
      # pool q: its one key is limited, which is usable
      - series: '$st,pool="q",key="k3",org="o3",state="ok"}'
        values: '0x10'
      - series: '$st,pool="q",key="k3",org="o3",state="limited"}'
        values: '1x10'
      - series: '$st,pool="q",key="k3",org="o3",state="dead"}'
        values: '0x10'
      # gw1 loses its Redis from 2m to 4m; gw2 never
      - series: 'ratepool_redis_up{job="ratepool",instance="gw1:80"}'
        values: '1 1 0 0 0 1 1 1 1 1 1'
      - series: 'ratepool_redis_up{job="ratepool",instance="gw2:80"}'
        values: '1x10'
      # team passes 90% of its day at 2m; free has no budget; team has
      # no month budget
      - series: '$bt$bu="team",period="day"}'
        values: '1000x10'
      - series: '$bused$bu="team",period="day"}'
        values: '0 500 950x8'
      - series: '$bt$bu="team",period="month"}'
        values: '0x10'
      - series: '$bused$bu="team",period="month"}'
        values: '0 500 950x8'
      - series: '$bt$bu="free",period="day"}'
        values: '0x10'
      - series: '$bused$bu="free",period="day"}'
        values: '0 5000x9'
      # p answers 6 429s and 10 5xx of 116 a minute; q one 429 at 2m and
      # 1 5xx of 101 a minute
      - series: '$pa,pool="p",status="2xx"}'
        values: '0+100x15'
      - series: '$pa,pool="p",status="429"}'
        values: '0+6x15'
      - series: '$pa,pool="p",status="5xx"}'
        values: '0+10x15'
      - series: '$pa,pool="q",status="2xx"}'
        values: '0+100x15'
      - series: '$pa,pool="q",status="429"}'
        values: '0 0 1x13'
      - series: '$pa,pool="q",status="5xx"}'
        values: '0+1x15'
      # 20 wait in p from 1m on, 5 in q
      - series: '$wa,pool="p"}'
        values: '0 20x10'
      - series: '$wa,pool="q"}'
        values: '5x10'
      # ops passes 90% of its \$0.50 a day at 2m, and has no month
      # budget; lab is at 85% of its \$100 a month; free has no budget
      - series: '$bd$bu="ops",period="day"}'
        values: '0.5x10'
      - series: '$bdused$bu="ops",period="day"}'
        values: '0 0.3 0.47x8'
      - series: '$bd$bu="ops",period="month"}'
        values: '0x10'
      - series: '$bdused$bu="ops",period="month"}'
        values: '0 0.3 0.47x8'
      - series: '$bd$bu="lab",period="month"}'
        values: '100x10'
      - series: '$bdused$bu="lab",period="month"}'
        values: '85x10'
      - series: '$bd$bu="free",period="day"}'
        values: '0x10'
      - series: '$bdused$bu="free",period="day"}'
        values: '0 7x9'
      # in p a request has waited over 30 s from 2m on; in q 20 s at
      # most; in r one waited 45 s at 2m only
      - series: '$ow,pool="p"}'
        values: '0 10 40+60x8'
      - series: '$ow,pool="q"}'
        values: '20x10'
      - series: '$ow,pool="r"}'
        values: '0 0 45 0x7'
    alert_rule_test:
      - eval_time: 4m
        alertname: RatepoolAllKeysCooling
        exp_alerts: []
      - eval_time: 5m
        alertname: RatepoolAllKeysCooling
        exp_alerts:
          - exp_labels: { severity: critical, $gw, pool: p }
            exp_annotations:
              summary: 'Every key of pool p is out of rotation'
              description: >-
                No key of pool p on gw1:80 is ok or limited: each one is
                cooling, spent, refused or dead, so its clients get 429s
                (or 503s). See ratepool_key_state and
                ratepool_key_cooldown_seconds for which and until when.
      - eval_time: 3m
        alertname: RatepoolKeyDead
        exp_alerts: []
      - eval_time: 4m
        alertname: RatepoolKeyDead
        exp_alerts:
          - exp_labels: { severity: warning, $gw, pool: p, key: k2,
                          org: o2, state: dead }
            exp_annotations:
              summary: 'Key k2 of pool p is dead'
              description: >-
                The provider refused key k2 (org o2, pool p) with a 401 on
                gw1:80. It is out of rotation until nginx is reloaded:
                revoked or mistyped; replace its secret and reload.
      - eval_time: 2m
        alertname: RatepoolStoreDown
        exp_alerts: []
      - eval_time: 3m
        alertname: RatepoolStoreDown
        exp_alerts:
          - exp_labels: { severity: critical, $gw }
            exp_annotations:
              summary: 'Gateway gw1:80 has lost its Redis'
              description: >-
                gw1:80 cannot reach the Redis that shares the fleet's
                limits; requests are decided by its redis_fail policy
                (local: a 1/N share of every limit, open: whole limits,
                closed: 503) until it is back.
      - eval_time: 6m
        alertname: RatepoolStoreDown
        exp_alerts: []
      - eval_time: 2m
        alertname: RatepoolBudgetNearlySpent
        exp_alerts: []
      - eval_time: 3m
        alertname: RatepoolBudgetNearlySpent
        exp_alerts:
          - exp_labels: { severity: warning, $gw, workspace: team,
                          period: day }
            exp_annotations:
              summary: 'Workspace team has used 95% of its day budget'
              description: >-
                Workspace team has used 95% of its token budget for the
                day (UTC); past it, its requests are refused until the
                next day. Raise daily_tokens or monthly_tokens, or tell
                its people.
      - eval_time: 2m
        alertname: RatepoolSpendingBudgetNearlySpent
        exp_alerts: []
      - eval_time: 3m
        alertname: RatepoolSpendingBudgetNearlySpent
        exp_alerts:
          - exp_labels: { severity: warning, $gw, workspace: ops,
                          period: day }
            exp_annotations:
              summary: >-
                Workspace ops has spent 94% of its day budget of \$0.50
              description: >-
                Workspace ops has spent 94% of its budget in dollars for
                the day (UTC), at list prices; past it, its requests are
                refused until the next day. Raise daily_usd or
                monthly_usd, or see who and what spends it
                (ratepool_client_cost_usd_total,
                ratepool_workspace_model_cost_usd_total).
      - eval_time: 8m
        alertname: RatepoolSpendingBudgetNearlySpent
        exp_alerts:
          - exp_labels: { severity: warning, $gw, workspace: ops,
                          period: day }
            exp_annotations:
              summary: >-
                Workspace ops has spent 94% of its day budget of \$0.50
              description: >-
                Workspace ops has spent 94% of its budget in dollars for
                the day (UTC), at list prices; past it, its requests are
                refused until the next day. Raise daily_usd or
                monthly_usd, or see who and what spends it
                (ratepool_client_cost_usd_total,
                ratepool_workspace_model_cost_usd_total).
      - eval_time: 3m
        alertname: RatepoolRequestsWaitLong
        exp_alerts: []
      - eval_time: 4m
        alertname: RatepoolRequestsWaitLong
        exp_alerts:
          - exp_labels: { severity: warning, $gw, pool: p }
            exp_annotations:
              summary: 'A request has waited 2m 40s for pool p'
              description: >-
                The request that has waited longest for room in pool p on
                gw1:80 has waited 2m 40s; the oldest wait has been over
                30 s for two minutes: demand is over what its keys allow
                (add keys or orgs), or a workspace's limits hold its
                requests. See ratepool_pool_waiting and
                ratepool_pool_waited_total{result="timed_out"}.
      - eval_time: 5m
        alertname: RatepoolClientsGet429s
        exp_alerts: []
      - eval_time: 6m
        alertname: RatepoolClientsGet429s
        exp_alerts:
          - exp_labels: { severity: warning, $gw, pool: p }
            exp_annotations: &p429
              summary: 'Clients of pool p are getting 429s'
              description: >-
                Pool p on gw1:80 has answered 429s to its clients for five
                minutes, 30 in the last five: its keys cannot take the
                load (add keys or orgs), or a workspace is past its limits
                or budget
                (ratepool_workspace_requests_total{result="rejected"}).
      - eval_time: 7m
        alertname: RatepoolClientsGet429s
        exp_alerts:
          - exp_labels: { severity: warning, $gw, pool: p }
            exp_annotations: *p429
      - eval_time: 5m
        alertname: RatepoolGatewayErrors
        exp_alerts: []
      - eval_time: 6m
        alertname: RatepoolGatewayErrors
        exp_alerts:
          - exp_labels: { severity: critical, $gw, pool: p }
            exp_annotations:
              summary: "8.621% of pool p's answers are errors"
              description: >-
                8.621% of what pool p on gw1:80 answered in the last five
                minutes were 5xx. See ratepool_key_responses_total and
                ratepool_key_failed_total for the keys, and the error log.
      - eval_time: 5m
        alertname: RatepoolQueueLong
        exp_alerts: []
      - eval_time: 6m
        alertname: RatepoolQueueLong
        exp_alerts:
          - exp_labels: { severity: warning, $gw, pool: p }
            exp_annotations:
              summary: "20 requests wait in pool p's queue"
              description: >-
                Pool p on gw1:80 has had more than 10 requests waiting for
                room for five minutes (now 20). See
                ratepool_pool_wait_seconds and
                ratepool_pool_waited_total{result="timed_out"}.
EOF

$out = `cd $dir && promtool test rules alerts-test.yml 2>&1`;
is($?, 0, 'promtool test rules: each alert fires when it should, and '
          . 'only then') or diag $out;

# --- gateways ----------------------------------------------------------------

my %KEY = map { $_ => "sk-ant-mock-$_-" . Ratepool::Test::random_hex(4) }
          qw(a1 a2 a3 c1 c2 w1 s1);
my %TOKEN = map { $_ => "gw-dash-$_-" . Ratepool::Test::random_hex(8) }
            qw(alice bob carol dave);

# the provider keeps a prompt cache per org
my $mock = $t->start_mock(port => 1, config => {
    keys => { map { $KEY{$_} => { org => "o$_", name => $_ } } keys %KEY },
    prompt_cache => JSON::PP::true,
    log_body => JSON::PP::false,
});

sub key_line {
    my ($name) = @_;
    return "ratepool_key $name org=o$name server=127.0.0.1:%%PORT_1%% "
           . "key=$KEY{$name};";
}

sub location {
    my ($pool, $wait) = @_;
    return <<"EOF";
        location /$pool/v1/ {
            rewrite ^/$pool(/.*)\$ \$1 break;
            ratepool_pass http://$pool;
            ratepool_wait $wait;
        }
EOF
}

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream main {
        ratepool zone=llm;
        ratepool_org oa1 rpm=1000 itpm=1000000 otpm=100000;
        ratepool_org oa2 rpm=1000 itpm=1000000 otpm=100000;
        ratepool_org oa3 rpm=1000 itpm=1000000 otpm=100000;
        ${\ key_line('a1') }
        ${\ key_line('a2') }
        ${\ key_line('a3') }
    }

    upstream cool {
        ratepool zone=llm;
        ${\ key_line('c1') }
        ${\ key_line('c2') }
    }

    upstream slow {
        ratepool zone=llm;
        ${\ key_line('w1') }
    }

    # the shipped list prices (dollars per million tokens)
    include $ROOT/conf-examples/prices.conf;

    ratepool_workspace team daily_tokens=10000000;
    ratepool_workspace interns daily_tokens=1000;
    ratepool_workspace ops daily_usd=0.10;
    ratepool_client team ${\ $t->token_hash($TOKEN{alice}) } name=alice;
    ratepool_client team ${\ $t->token_hash($TOKEN{bob}) } name=bob;
    ratepool_client interns ${\ $t->token_hash($TOKEN{carol}) } name=carol;
    ratepool_client ops ${\ $t->token_hash($TOKEN{dave}) } name=dave;

    server {
        listen 127.0.0.1:%%PORT_0%%;

${\ location('main', '5s') }
        # Claude Code's path, for the conversation
        location /v1/ {
            ratepool_pass http://main;
        }

${\ location('cool', '1s') }
${\ location('slow', '5s') }
        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

# A second gateway shares its limits through a real Redis, so that the
# Store row has something to show (it is empty without Redis).
my $REDIS = $ENV{RATEPOOL_REDIS_SERVER} // '/usr/bin/redis-server';
my ($t2, $redis);
if (-x $REDIS) {
    $t2 = Ratepool::Test->new;
    $redis = $t2->start_redis;
    $t2->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis=127.0.0.1:${\ $redis->port }
                  redis_timeout=200ms;

    upstream shared {
        ratepool zone=llm;
        ratepool_org os1 rpm=1000 itpm=1000000 otpm=100000;
        ratepool_key s1 org=os1 server=127.0.0.1:${\ $mock->port }
                     key=$KEY{s1};
    }

    ratepool_workspace team daily_tokens=10000000;
    ratepool_client team ${\ $t->token_hash($TOKEN{bob}) } name=bob;

    server {
        listen 127.0.0.1:%%PORT_0%%;

${\ location('shared', '5s') }
        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF
    $t2->run;
    ok(Ratepool::Test::redis_connected($t2),
       'the second gateway shares its limits through Redis');
} else {
    diag "no $REDIS: the Store row is checked to be empty";
}

# --- a real Prometheus, with the rules, every for: made 0s ---------------

# The shipped for: values hold an alert for minutes; here each fires at
# the first evaluation that finds it true, once a second.
(my $now_rules = $rules) =~ s/^(\s+for:) \S+$/$1 0s/mg;
$t->write_file('alerts-live.yml', $now_rules);

my @targets = map { "'127.0.0.1:$_'" }
              $t->port(0), $t2 ? $t2->port(0) : ();
my $port = $t->port(2);

$t->write_file('prometheus.yml', <<"EOF");
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [alerts-live.yml]
scrape_configs:
  - job_name: ratepool
    metrics_path: /ratepool/status
    params:
      format: [prometheus]
    static_configs:
      - targets: [${\ join ', ', @targets }]
EOF

my $pid = Ratepool::Test::_spawn("$dir/prometheus.log", '/usr/bin/prometheus',
    "--config.file=$dir/prometheus.yml", "--storage.tsdb.path=$dir/tsdb",
    "--web.listen-address=127.0.0.1:$port");

END { kill 'TERM', $pid if $pid }

sub uri_escape {
    my ($s) = @_;
    $s =~ s/([^A-Za-z0-9_.~-])/sprintf '%%%02X', ord $1/ge;
    return $s;
}

sub api {
    my ($path) = @_;
    my $r = $t->http(port => $port, path => "/api/v1/$path");
    return eval { decode_json($r->{body}) } || { error => $r->{body} };
}

sub query { api('query?query=' . uri_escape($_[0])) }

my $deadline = time + 20;
my $up = [];
while (time < $deadline) {
    $up = query('up == 1')->{data}{result} || [];
    last if @$up == @targets;
    sleep 0.25;
}
is(scalar @$up, scalar @targets,
   'Prometheus scrapes ' . @targets . ' gateway(s)');

# rates want the counters before: the traffic comes once they are scraped
sleep 1.2;

# --- traffic -------------------------------------------------------------

sub ask {
    my ($who, $pool, @headers) = @_;
    return $t->messages(token => $TOKEN{$who}, path => "/$pool/v1/messages",
                        headers => \@headers)->{status};
}

# a1 is refused (401) whenever it is tried: its request moves on
$mock->script($KEY{a1}, [ { status => 401 } ], sticky => 1);

my @got;
for (1 .. 20) {
    push @got, ask('alice', 'main');
    my $main = Ratepool::Test::by_name($t->status->{pools})->{main};
    last if Ratepool::Test::by_name($main->{keys})->{a1}{state} eq 'dead';
}
ok(!grep({ $_ != 200 } @got) && @got < 20,
   'a1 is dead after ' . @got . ' requests, all answered');

# a Claude Code session: its turns go home to their prompt cache
my $c = Ratepool::Conversation->new('dash', session => 'dash-session');
is(join(',', map { $c->turn($t, token => $TOKEN{alice})->{status} } 1 .. 3),
   '200,200,200', 'three turns of a conversation');

# every key of cool answers 429 for five minutes
$mock->script($KEY{$_}, [ { status => 429, retry_after => '300' } ],
              sticky => 1) for qw(c1 c2);
is(ask('alice', 'cool'), 429, 'no key of cool can hide its 429');
is(ask('bob', 'cool'), 429, 'and then the gateway gives one itself');

is(ask('bob', 'main', 'x-mock-status' => 500), 500, 'a provider\'s 500');
is($t->messages(token => 'gw-dash-nobody', path => '/main/v1/messages')
     ->{status}, 401, 'an unknown token');

# 920 of interns' 1000 tokens today
is(ask('carol', 'main', 'x-mock-usage' => '{"input_tokens":900,'
                                          . '"output_tokens":20}'),
   200, 'carol uses 92% of her workspace\'s budget');

# 25,000 input and 1,200 output tokens of Sonnet: $0.093 of ops' $0.10
is(ask('dave', 'main', 'x-mock-usage' => '{"input_tokens":25000,'
                                         . '"output_tokens":1200}'),
   200, 'dave spends 93% of his workspace\'s budget in dollars');

# slow's one key cools for a second: the request waits, then is served
$mock->script($KEY{w1}, [ { status => 429, retry_after => '1' } ]);
is(ask('bob', 'slow'), 200, 'a request waits for slow\'s key');

if ($t2) {
    is($t2->messages(token => $TOKEN{bob}, path => '/shared/v1/messages')
         ->{status}, 200, 'a request through the Redis gateway');
}

# --- every panel has data, the alerts fire ---------------------------------

my %EXPECT = (
    RatepoolKeyDead => [ 'main/a1' ],
    RatepoolAllKeysCooling => [ 'cool' ],
    RatepoolBudgetNearlySpent => [ 'interns/day' ],
    RatepoolClientsGet429s => [ 'cool' ],
    RatepoolStoreDown => [],
    RatepoolSpendingBudgetNearlySpent => [ 'ops/day' ],
    RatepoolRequestsWaitLong => [],
);

sub firing {
    my %by;
    for my $alert (@{ api('alerts')->{data}{alerts} || [] }) {
        next unless $alert->{state} eq 'firing';
        my $l = $alert->{labels};
        push @{ $by{ $l->{alertname} } }, join '/',
            grep { defined } @$l{qw(workspace pool key period)};
    }
    return { map { $_ => [ sort @{ $by{$_} || [] } ] } keys %EXPECT };
}

# the Money row's have more than zeros: something was spent
sub has_data {
    my ($result, $spent) = @_;
    return scalar grep { $_->{value}[1] ne 'NaN'
                         && (!$spent || $_->{value}[1] > 0) } @$result;
}

my $CANONICAL = JSON::PP->new->canonical;
my ($empty, $firing);
$deadline = time + 20;
while (1) {
    $empty = [];
    for my $q (@queries) {
        my ($title, $row, $expr) = @$q;
        my $j = query($expr);
        my $result = $j->{data}{result} || [];
        my $want = $row ne 'Store' || $t2;

        push @$empty, "$title ($row): $expr: "
                      . ($j->{error} // scalar(@$result) . ' series')
            if ($j->{status} // '') ne 'success'
               || ($want ? !has_data($result, $row eq 'Money')
                         : @$result);
    }
    $firing = firing();
    last if (!@$empty && $CANONICAL->encode($firing)
                         eq $CANONICAL->encode(\%EXPECT))
            || time > $deadline;
    sleep 0.5;
}

is_deeply($empty, [], $t2 ? 'every query of every panel has data'
                          : 'every panel has data, the Store row none')
    or diag explain $empty;

for my $alert (sort keys %EXPECT) {
    is_deeply($firing->{$alert}, $EXPECT{$alert},
              "$alert fires for: "
              . (join(', ', @{ $EXPECT{$alert} }) || 'nothing'));
}

# the spending alert says how much of how many dollars
my ($spent) = grep { $_->{labels}{alertname}
                     eq 'RatepoolSpendingBudgetNearlySpent' }
              @{ api('alerts')->{data}{alerts} || [] };
like($spent && $spent->{annotations}{summary},
     qr/^Workspace ops has spent 93% of its day budget of \$0\.10$/,
     'its summary: 93% of $0.10')
    or diag explain $spent;

# the variables' values come from the exposition
for my $name (sort keys %var) {
    my $j = api("label/$name/values?match[]="
                . uri_escape($var{$name}{metric}));
    my %values = map { $_ => 1 } @{ $j->{data} || [] };
    my @want = $name eq 'pool' ? qw(main cool slow)
                               : qw(team interns ops);
    is_deeply([ grep { !$values{$_} } @want ], [],
              "\$$name lists " . join(', ', @want));
}

# --- a lost Redis fires RatepoolStoreDown ---------------------------------

if ($t2) {
    $redis->stop;
    $t2->messages(token => $TOKEN{bob}, path => '/shared/v1/messages');

    my $store;
    $deadline = time + 15;
    while (time < $deadline) {
        $store = firing()->{RatepoolStoreDown};
        last if @$store;
        sleep 0.5;
    }
    is(scalar @$store, 1, 'RatepoolStoreDown fires once Redis is gone');
}

kill 'TERM', $pid;
waitpid $pid, 0;
undef $pid;

$t->stop;
$t->check_log;
if ($t2) {
    $t2->stop;
    $t2->check_log;
}

diag sprintf 'took %.1f s', time - $t0 if $ENV{TEST_VERBOSE};

done_testing;
