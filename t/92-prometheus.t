#!/usr/bin/perl

# The Prometheus exposition, checked by Prometheus itself: it passes
# `promtool check metrics` (names, units, _total for counters, HELP and
# TYPE for each), and a real Prometheus server (Debian's package) scrapes
# a gateway and answers queries with what the gateway counted.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

plan skip_all => 'no promtool or prometheus (make deps installs them)'
    unless -x '/usr/bin/promtool' && -x '/usr/bin/prometheus';

my $t = Ratepool::Test->new;
my $dir = $t->testdir;

my $KEY = 'sk-ant-mock-p1-' . Ratepool::Test::random_hex(8);
my $TOKEN = 'gw-prom-' . Ratepool::Test::random_hex(8);

$t->start_mock(port => 1, config => {
    keys => { $KEY => { org => 'org-p', name => 'p1' } } });

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-p rpm=100 itpm=100000 otpm=10000;
        ratepool_org org-p model=claude-opus-* rpm=10;
        ratepool_key p1 org=org-p server=127.0.0.1:%%PORT_1%% key=$KEY;
    }

    ratepool_workspace team rpm=100 daily_tokens=1000000;
    ratepool_client team ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /metrics {
            ratepool_status;
        }
    }
}
EOF

$t->run;

is($t->messages(token => $TOKEN)->{status}, 200, "request $_ answered")
    for 1 .. 3;

my $metrics = $t->http(port => $t->port(0),
                       path => '/metrics?format=prometheus')->{body};
$t->write_file('metrics.txt', $metrics);

my $out = `promtool check metrics < $dir/metrics.txt 2>&1`;
is($?, 0, 'the exposition passes promtool check metrics') or diag $out;

# --- a real Prometheus scrapes it ------------------------------------------

my $port = $t->port(2);
$t->write_file('prometheus.yml', <<"EOF");
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: ratepool
    metrics_path: /metrics
    params:
      format: [prometheus]
    static_configs:
      - targets: ['127.0.0.1:${\ $t->port(0)}']
EOF

my $pid = Ratepool::Test::_spawn("$dir/prometheus.log", '/usr/bin/prometheus',
    "--config.file=$dir/prometheus.yml", "--storage.tsdb.path=$dir/tsdb",
    "--web.listen-address=127.0.0.1:$port");

END { kill 'TERM', $pid if $pid }

sub query {
    my ($q) = @_;
    my $r = $t->http(port => $port,
                     path => '/api/v1/query?query=' . $q);
    my $j = eval { decode_json($r->{body}) } || {};
    return $j->{data}{result} || [];
}

my ($up, $requests);
my $deadline = time + 20;
while (time < $deadline) {
    $up = query('up%7Bjob%3D%22ratepool%22%7D');
    $requests = query('ratepool_requests_total');
    last if @$up && $up->[0]{value}[1] eq '1' && @$requests;
    sleep 0.5;
}

is(@$up ? $up->[0]{value}[1] : undef, '1',
   'a real Prometheus scrapes the gateway');
is(@$requests ? $requests->[0]{value}[1] : undef, '3',
   'and has its request count');

my $sent = query('ratepool_key_sent_total%7Bkey%3D%22p1%22%7D');
is(@$sent ? $sent->[0]{value}[1] : undef, '3',
   'and the key\'s, by its name');

my $tokens = query('ratepool_org_tokens_total');
ok(@$tokens > 0, 'and the orgs\' tokens (' . scalar(@$tokens) . ' series)');

kill 'TERM', $pid;
waitpid $pid, 0;
undef $pid;

$t->stop;
$t->check_log;

done_testing;
