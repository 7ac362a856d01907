#!/usr/bin/perl

# A Redis Cluster (redis_cluster=, its nodes): the zone's keys share one
# hash tag, so one node owns them all; a gateway that asks another is
# told MOVED and goes to the owner.  When the owner dies under load the
# cluster promotes its replica and the gateways follow, with no reload:
# no request fails (redis_fail=local decides meanwhile), the log says
# where the slot went, the status counts the failover.  Real
# redis-server nodes, made a cluster by redis-cli --cluster create.

use strict;
use warnings;

use lib 't/lib';

use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;
my $dir = $t->testdir;
my $server = $ENV{RATEPOOL_REDIS_SERVER} // '/usr/bin/redis-server';
plan skip_all => "no redis-server at $server" unless -x $server;

# six nodes: three masters, a replica each
my @node;
for my $n (1 .. 6) {
    my $port = $t->_anonymous_port;
    my $pid = Ratepool::Test::_spawn("$dir/node$n.log", $server,
        '--port', $port, '--bind', '127.0.0.1', '--save', '',
        '--appendonly', 'no', '--dir', $dir, '--daemonize', 'no',
        '--cluster-enabled', 'yes',
        '--cluster-config-file', "$dir/nodes-$port.conf",
        '--cluster-node-timeout', 1000,
        # a replica may take over however long ago it last heard its
        # master: here the test decides when the master dies
        '--cluster-replica-validity-factor', 0,
        # the bus on a free port too, not the port + 10000 it would take
        '--cluster-port', $t->_anonymous_port);
    push @node, { port => $port, pid => $pid };
}

END { kill KILL => $_->{pid} for @node }

sub cli {
    my ($port, @cmd) = @_;
    open my $fh, '-|', 'redis-cli', '-p', $port, @cmd or die $!;
    local $/;
    my $out = <$fh> // '';
    close $fh;
    return $out;
}

for my $n (@node) {
    my $deadline = time + 5;
    sleep 0.05 until Ratepool::Test::_accepts($n->{port}) || time > $deadline;
}

system('redis-cli --cluster create '
       . join(' ', map { "127.0.0.1:$_->{port}" } @node)
       . " --cluster-replicas 1 --cluster-yes > $dir/create.log 2>&1") == 0
    or BAIL_OUT('redis-cli --cluster create failed: '
                . $t->read_file('create.log'));

my $deadline = time + 15;
sleep 0.2 until !grep({ cli($_->{port}, 'CLUSTER', 'INFO')
                        !~ /cluster_state:ok/ } @node)
                || time > $deadline;

# the node that owns the zone's slot, as the cluster says now
my ($slot) = cli($node[0]{port}, 'CLUSTER', 'KEYSLOT', 'ratepool:{llm}:w')
             =~ /(\d+)/;

sub owner {
    for my $n (@node) {
        next if $n->{dead};
        for (split /\n/, cli($n->{port}, 'CLUSTER', 'NODES')) {
            my @f = split / /;
            next unless $f[2] =~ /master/ && $f[2] !~ /fail/;
            for my $range (@f[8 .. $#f]) {
                my ($from, $to) = $range =~ /^(\d+)(?:-(\d+))?$/ or next;
                $to //= $from;
                return ($f[1] =~ /:(\d+)/)[0]
                    if $slot >= $from && $slot <= $to;
            }
        }
        last;
    }
    return 0;
}

my $first = owner();
ok($first, "one node owns the zone's slot $slot");

my $KEY = 'sk-ant-mock-c1-' . Ratepool::Test::random_hex(8);
my $TOKEN = 'gw-cluster-' . Ratepool::Test::random_hex(8);
my $mock = $t->start_mock(port => 1);

# the gateways know the three masters, the owner last: the others say MOVED
my @masters = grep { cli($_->{port}, 'ROLE') =~ /^master/ } @node;
my $nodes = join ',', map { "127.0.0.1:$_->{port}" }
            sort { ($a->{port} == $first) <=> ($b->{port} == $first) }
            @masters;

my @gw = map { Ratepool::Test->new } 1 .. 2;

for my $g (@gw) {
    $g->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis_cluster=$nodes redis_timeout=200ms;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-c rpm=100000;
        ratepool_key c1 org=org-c server=127.0.0.1:${\ $mock->port }
                     key=$KEY;
    }

    ratepool_workspace team rpm=100000;
    ratepool_client team ${\ $g->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF
    $g->run;
}

sub settle_on {
    my ($port) = @_;
    my $deadline = time + 10;
    while (time < $deadline) {
        $_->messages(token => $TOKEN) for @gw;
        last unless grep { ($_->status->{store}{server} // '') ne
                           "127.0.0.1:$port" } @gw;
        sleep 0.2;
    }
}

settle_on($first);

for my $g (@gw) {
    my $store = $g->status->{store};
    is($store->{server}, "127.0.0.1:$first",
       'a gateway followed MOVED to the slot\'s owner');
    is($store->{state}, 'up', 'and shares its limits there');
    is($store->{failovers}, 0, 'no failover yet');
}
like(cli($first, 'KEYS', '*'), qr/ratepool:\{llm\}:w:team/,
     'the owner holds the zone\'s keys');

# --- load on both gateways; the owner dies ------------------------------------

my $load = $t->load_start(\@gw, $TOKEN, 10);

sleep 1.5;
my ($dead) = grep { $_->{port} == $first } @node;
my $killed = time;
kill KILL => $dead->{pid};
$dead->{dead} = 1;

$deadline = time + 20;
sleep 0.2 while (owner() == $first || owner() == 0) && time < $deadline;
my $second = owner();
ok($second && $second != $first, 'the cluster promoted the replica');
my $promoted = time - $killed;

my ($all, $longest) = $t->load_end($load);
my @all = @$all;

my $failed = grep { $_ != 200 } @all;
ok(@all > 50, scalar(@all) . ' requests were sent during the failover');
is($failed, 0, 'none failed');
diag sprintf 'cluster failover: promoted %.1f s after the owner died; '
    . '%d requests, %d failed, the longest took %.3f s', $promoted,
    scalar @all, $failed, $longest // 0;

settle_on($second);

for my $g (@gw) {
    my $store = $g->status->{store};
    is($store->{server}, "127.0.0.1:$second",
       'a gateway uses the new owner, without a reload');
    is($store->{state}, 'up', 'and shares its limits there');
    is($store->{failovers}, 1, 'the failover is counted once');
    like($g->error_log,
         qr/\[warn\].*redis master "the zone's slot" moved from 127\.0\.0\.1:$first to 127\.0\.0\.1:$second, as the cluster says/,
         'and logged');
}

like(cli($second, 'KEYS', '*'), qr/ratepool:\{llm\}:w:team/,
     'decided in the new owner');

# --- the slot migrates to another master, as a reshard moves it ---------------

my ($to) = map { $_->{port} }
           grep { !$_->{dead} && $_->{port} != $second
                  && cli($_->{port}, 'ROLE') =~ /^master/ } @node;
my %id = map { $_ => (cli($_, 'CLUSTER', 'MYID') =~ /(\w+)/)[0] }
         $second, $to;

cli($to, 'CLUSTER', 'SETSLOT', $slot, 'IMPORTING', $id{$second});
cli($second, 'CLUSTER', 'SETSLOT', $slot, 'MIGRATING', $id{$to});
my @keys = grep { length } split /\n/,
           cli($second, 'CLUSTER', 'GETKEYSINSLOT', $slot, 1000);
cli($second, 'MIGRATE', '127.0.0.1', $to, '', 0, 5000, 'KEYS', @keys);

my $conns = sub {
    (cli($_[0], 'INFO', 'stats') =~ /total_connections_received:(\d+)/)[0]
};
my $before = $conns->($second) + $conns->($to);
my @codes = map { $gw[$_ % 2]->messages(token => $TOKEN)->{status} } 1 .. 20;
sleep 2;
is(join(',', @codes), join(',', (200) x 20),
   'while the slot migrates (ASK), requests are answered');
cmp_ok($conns->($second) + $conns->($to) - $before, '<', 60,
       'and the gateways do not bounce between the two nodes');
is($_->status->{store}{failovers}, 1, 'nor count a failover for it') for @gw;

# the migration ends: the new owner is said by MOVED, and followed
cli($_->{port}, 'CLUSTER', 'SETSLOT', $slot, 'NODE', $id{$to})
    for grep { !$_->{dead} && cli($_->{port}, 'ROLE') =~ /^master/ } @node;
settle_on($to);
is($_->status->{store}{server}, "127.0.0.1:$to",
   'after the migration a gateway uses the slot\'s new owner') for @gw;

$_->check_log for @gw;

done_testing;
